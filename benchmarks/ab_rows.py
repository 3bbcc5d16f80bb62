"""The row tangent of two revisions in one process: MeanFlow training steps on the plain DiT, interleaved.

    python benchmarks/ab_rows.py --base 2b07511 [--rounds 15] [--threads 1] [--batch 64]

On shared cores the load drifts by more than the change being measured, so separate
``bench_step.py`` runs cannot compare two versions to the second digit. Here the row-tangent
modules (``meanflow/autodiff/rows.py``, ``row_mode.py``, ``row_rules.py``) of ``--base`` are
loaded from git beside the working tree's, and every round runs, in a fresh seeded order, the
Flow Matching step and the MeanFlow steps at 25% and 75% r != t with each version (the same
model, optimizer state and batch as ``bench_step.py --preset plain``). Printed: the median over
rounds of each step's time over the same round's Flow Matching step.
"""
from __future__ import annotations

import argparse
import importlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

import bench_step
from meanflow import FlowMatchingLoss, MeanFlowLoss

jvp_layer = importlib.import_module("meanflow.autodiff.jvp")
ROW_MODULES = ("rows.py", "row_mode.py", "row_rules.py")


def load_base(revision: str, into: Path) -> ModuleType:
    """The ``rows`` module of ``revision``, imported as package ``rows_base`` from files git prints into ``into``."""
    package = into / "rows_base"
    package.mkdir()
    (package / "__init__.py").write_text("")
    root = Path(__file__).resolve().parents[1]
    for name in ROW_MODULES:
        source = subprocess.run(["git", "-C", str(root), "show", f"{revision}:src/meanflow/autodiff/{name}"],
                                capture_output=True, text=True, check=True).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(into))
    return importlib.import_module("rows_base.rows")


def steps(row_jvps: dict[str, Callable], batch: int) -> dict[str, Callable[[int], None]]:
    """name -> training step(seed): 'fm', and 'mf25' / 'mf75' with each version's row_jvp (``jvp='rows'``)."""
    args = bench_step.parse_args(["--device", "cpu", "--preset", "plain", "--models", "plain-dit", "--batch", str(batch)])
    model, optimizer, x, labels = bench_step.build(bench_step.cases_for(args)[0], "cpu")

    def step(loss_fn, row_jvp: Callable | None) -> Callable[[int], None]:
        def run(seed: int) -> None:
            jvp_layer.row_jvp = row_jvp or jvp_layer.row_jvp
            bench_step.train_step(loss_fn, model, optimizer, x, labels, seed, "cpu", "none")
        return run

    out = {"fm": step(FlowMatchingLoss(), None)}
    for ratio in (25, 75):
        for version, row_jvp in row_jvps.items():
            out[f"mf{ratio} {version}"] = step(MeanFlowLoss(ratio=ratio / 100, jvp="rows"), row_jvp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        fns = steps({args.base: base.row_jvp, "worktree": jvp_layer.row_jvp}, args.batch)
        times = {name: [] for name in fns}
        for i in range(args.warmup + args.rounds):
            for name in random.Random(i).sample(list(fns), len(fns)):
                start = time.perf_counter()
                fns[name](i)
                times[name].append(time.perf_counter() - start)
    fm = times["fm"][args.warmup:]
    print(f"plain DiT, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds; FM step {statistics.median(fm) * 1000:.1f} ms")
    for name, values in times.items():
        ratio = statistics.median(v / f for v, f in zip(values[args.warmup:], fm))
        print(f"  {name:<22} {statistics.median(values[args.warmup:]) * 1000:7.1f} ms  {ratio:.3f}x FM")


if __name__ == "__main__":
    main()
