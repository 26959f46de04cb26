"""
The main job as a script: prune SmolLM2-135M-Instruct (or --model) at 60% with
Wanda and with Wanda + DSnoT (each objective), and print the held-out perplexity
of each next to the dense model's. Same as `dsnot run`; run it in the project's
environment (./scripts/run-main builds it):

    .venv/bin/python examples/main_job.py --sparsity 2:4 --json runs/main_2of4.json
"""

import sys

from dsnot_modifier.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
