"""
The harness that proves the library, installed apart from it (``dsnot-harness``):
the embedded SmolLM2 model (:mod:`.models`), Jane Austen's novels as calibration
and held-out text (:mod:`.data`), perplexity and zero-shot tasks (:mod:`.evaluate`),
oneshot runs of a recipe (:mod:`.pipeline`), the main job (:mod:`.main_job`) and the
benchmark matrix (:mod:`.bench`). ``run``, ``bench`` and ``eval`` join the library's
``dsnot`` command through the ``dsnot.commands`` entry points.

The library (``dsnot_modifier``) imports nothing from here.
"""
