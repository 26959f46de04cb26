"""
Perplexity of a saved checkpoint on held-out text (same as `dsnot eval`):

    .venv/bin/python examples/evaluate.py out/smollm2-2of4 --text prideprejudice --text my_text.txt
"""

import sys

from dsnot_modifier.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
