"""``meanflow report RUN``: one PNG page showing whether a run is healthy (loss curves, time-bin heat
maps, gradient norm, skipped steps, newest samples, metrics), written to RUN/report.png."""
from __future__ import annotations

import argparse

from ..evaluation.report import render_report


def register(sub) -> None:
    p = sub.add_parser("report", help="render a run's health report (PNG)", description=__doc__)
    p.add_argument("run", help="run directory (made by `meanflow train`)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/report.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"report: {render_report(args.run, args.out)}")
    return 0
