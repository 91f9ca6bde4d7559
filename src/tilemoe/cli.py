"""The `tilemoe` command: one subcommand per module, each adding its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module with add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "models": "tilemoe.bench.models_cli",
    "bench": "tilemoe.bench.cli",
    "journey": "tilemoe.bench.journey",
    "tune": "tilemoe.tune_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilemoe", description="Fast MoE layers: models, bench, journey, tune")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
