"""
The experiment harness: what proves the product, not part of it. The embedded
SmolLM2 model (:mod:`.models`), Jane Austen's novels as calibration and held-out
text (:mod:`.data`), perplexity and zero-shot tasks (:mod:`.evaluate`), oneshot
runs of a recipe (:mod:`.pipeline`), the benchmark matrix (:mod:`.bench`) and the
``dsnot`` command (:mod:`.cli`).

The core (``dsnot_modifier`` itself) imports nothing from here.
"""
