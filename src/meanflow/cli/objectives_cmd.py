"""``meanflow objectives``: list the training objectives and their options (``objective.KEY=VALUE``).

Defaults and allowed values come from the objectives' own option declarations, the same ones
the config checks and the constructors take.
"""
from __future__ import annotations

import argparse

from .. import objectives


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``objectives`` sub-command."""
    parser = subparsers.add_parser(
        "objectives", help="list objectives and their options", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--kind", default=None, help="show only this objective (e.g. imf)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kinds = [objectives.get(args.kind).kind] if args.kind else objectives.available()
    for kind in kinds:
        cls = objectives.get(kind)
        print(f"{kind}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for name, option in cls.option_set().options.items():
            setting = f"objective.{name}={option.default!r}"
            print(f"  {setting:<34} {option.describe():<38} {option.doc}")
    return 0
