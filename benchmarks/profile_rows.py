"""Where the row tangent's time goes on the plain DiT: one ``row_jvp`` pass against a plain forward.

    python benchmarks/profile_rows.py [--rows 48] [--batch 64] [--threads 1] [--repeats 7]
    python benchmarks/profile_rows.py --fixed [--repeats 31]

Prints the time of a row pass (the forward of the whole batch with the tangent of its first
``--rows`` rows, as MeanFlow's ``jvp="rows"`` runs it) over a plain forward with gradient
(interleaved medians), then torch.profiler's self CPU time per op for both and their difference:
the ops the tangent adds (matmuls of the tangent rows, backward kernels of norms and GELU, the
attention tangent's products) and the copies it makes of non-contiguous tangents.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from bench_step import interleave
from meanflow.autodiff.rows import row_jvp
from plain_dit import PlainDiT


def build(batch: int, rows: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(row pass, plain forward) of the benchmark's plain DiT (dit-tiny/2 size, 16x16x4, 10 classes)."""
    torch.manual_seed(0)
    model = PlainDiT(channels=4, size=16, dim=128, depth=4, heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)  # the zero-initialised layers: make u and du/dt non-trivial
    gen = torch.Generator().manual_seed(1)
    z, r = torch.randn(batch, 4, 16, 16, generator=gen), 0.5 * torch.rand(batch, generator=gen)
    t, labels = r + 0.5, torch.randint(0, 10, (batch,), generator=gen)
    dz, dt = torch.randn(rows, 4, 16, 16, generator=gen), torch.ones(rows)

    def forward(z, r, t):
        return model(z, r, t, labels)

    return (lambda: row_jvp(forward, (z, r, t), (dz, None, dt))), (lambda: forward(z, r, t))


def self_times(fn: Callable[[], object]) -> tuple[dict[str, float], int]:
    """Self CPU milliseconds per op name of one call, and how many torch calls it made from Python (top-level ops)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        times[event.key] += event.self_cpu_time_total / 1000
    return times, sum(event.cpu_parent is None for event in prof.events())


class BareMode(TorchFunctionMode):
    """Runs every torch call, then the same call once more on the first row of its batched arguments, kept aside."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.kept = batch, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.ndim and out.shape[0] == self.batch:
            row = [a.narrow(0, 0, 1) if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == self.batch else a
                   for a in args]
            with torch.no_grad():
                try:
                    self.kept[id(out)] = func(*row, **kwargs)
                except (RuntimeError, TypeError, ValueError, IndexError):
                    pass  # an op whose other arguments need the whole batch (a reshape to B x ...): no second call
        return out


def fixed_costs(batch: int, repeats: int) -> None:
    """Print the row-independent cost of the row tangent: CPU ms per forward, one thread, minimum over rounds."""
    torch.set_num_threads(1)
    rows_pass, plain = build(batch, 1)

    def bare() -> None:
        with BareMode(batch):
            plain()

    calls = {"plain forward": plain, "row pass, 1 tangent row": rows_pass, "bare mode (op again on 1 row)": bare}
    times = interleave({name: (lambda seed, fn=fn: fn()) for name, fn in calls.items()}, 1, repeats, clock=time.process_time)
    base = min(times["plain forward"])
    for name, values in times.items():
        print(f"{name:<32} {1000 * min(values):8.1f} ms CPU  (+{1000 * (min(values) - base):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--fixed", action="store_true", help="measure the row-independent cost instead (one thread)")
    args = parser.parse_args()
    if args.fixed:
        fixed_costs(args.batch, args.repeats)
        return
    torch.set_num_threads(args.threads)
    rows_pass, plain = build(args.batch, args.rows)
    ratios = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        rows_pass()
        middle = time.perf_counter()
        plain()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    print(f"row pass ({args.rows} of {args.batch} rows) / plain forward: median {statistics.median(ratios[1:]):.3f} "
          f"over {args.repeats} rounds (first round dropped)")
    (with_rows, calls_rows), (without, calls_plain) = self_times(rows_pass), self_times(plain)
    print(f"self CPU ms: row pass {sum(with_rows.values()):.1f}, plain forward {sum(without.values()):.1f}; "
          f"top-level torch ops: row pass {calls_rows}, plain forward {calls_plain}")
    print(f"{'op':<50} {'row pass':>9} {'plain':>9} {'added':>9}")
    for name in sorted(with_rows, key=lambda k: without.get(k, 0.0) - with_rows[k])[:args.top]:
        print(f"{name[:50]:<50} {with_rows[name]:9.1f} {without.get(name, 0.0):9.1f} {with_rows[name] - without.get(name, 0.0):9.1f}")


if __name__ == "__main__":
    main()
