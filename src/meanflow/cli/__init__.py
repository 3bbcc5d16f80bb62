"""CLI floor (top): ``meanflow <command> ...`` (also ``python -m meanflow``); parses flags and calls the
floors below, holding no logic of its own beyond argument checks and printing."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..config import ConfigError

# Each module defines ``register(subparsers)``, adding a sub-command whose ``func(args)`` runs it.
COMMANDS = ("train", "sample", "evaluate", "models_cmd", "objectives_cmd", "fid_stats", "encode", "sweep", "report", "import_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meanflow", description="Train and sample one-step MeanFlow generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"meanflow.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"meanflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
