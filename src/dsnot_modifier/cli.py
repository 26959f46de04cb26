"""
The ``dsnot`` command: ``dsnot verify PATH`` checks a saved checkpoint against its
``dsnot_report.json``; other commands come from installed packages that register a
module under the entry-point group ``dsnot.commands`` (the repository's harness,
``dsnot-harness``, registers ``run``, ``bench`` and ``eval``).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

__all__ = ["COMMANDS_GROUP", "main"]

#: entry points in this group name a module with ``add_parser(sub)`` and ``run(args) -> int``
COMMANDS_GROUP = "dsnot.commands"
#: the commands that the harness (``harness/`` in the repository) provides
HARNESS_COMMANDS = ("run", "bench", "eval")
_INSTALL_HARNESS = "install it with `pip install -e harness` in the repository's checkout, or run scripts/setup"


def add_verify_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "verify",
        help="check a saved checkpoint's zeros and N:M structure against its dsnot_report.json",
        description=(
            "Read the safetensors weights of a saved checkpoint (dense, or quantized by "
            "llm-compressor in the compressed-tensors format), print every DSnoT layer's "
            "sparsity and N:M structure, and exit 1 if they are not what dsnot_report.json "
            "states (2 if the checkpoint or its report cannot be read)."
        ),
    )
    parser.add_argument("path", help="checkpoint directory")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")
    return parser


def run_verify(args) -> int:
    from dsnot_modifier.checkpoint import CheckpointError, verify_checkpoint
    from dsnot_modifier.report import write_json

    try:
        result = verify_checkpoint(args.path)
    except CheckpointError as err:
        print(f"dsnot verify: {err}", file=sys.stderr, flush=True)
        return 2
    print(result.table(), flush=True)
    if args.json_path:
        write_json(args.json_path, result.to_dict())
    return 0 if result.ok else 1


def _parser(commands: dict) -> argparse.ArgumentParser:
    """``dsnot``'s parser: ``commands`` (name -> module with add_parser and run), then verify."""
    missing = [name for name in HARNESS_COMMANDS if name not in commands]
    parser = argparse.ArgumentParser(
        prog="dsnot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{', '.join(missing)}: the harness is not installed; {_INSTALL_HARNESS}" if missing else None,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in commands.values():
        module.add_parser(sub).set_defaults(handler=module.run)
    add_verify_parser(sub).set_defaults(handler=run_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    asked = next((arg for arg in argv if not arg.startswith("-")), None)
    registered = entry_points(group=COMMANDS_GROUP)
    if asked in HARNESS_COMMANDS and asked not in registered.names:
        print(f"dsnot {asked}: this command comes with the benchmark harness (dsnot-harness), "
              f"which is not installed; {_INSTALL_HARNESS}", file=sys.stderr, flush=True)
        return 2
    # `dsnot verify` needs nothing from other packages: it does not import them
    commands = {} if asked == "verify" else {ep.name: ep.load() for ep in registered}
    args = _parser(commands).parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
