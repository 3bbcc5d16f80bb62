"""Why 2-NFE can be worse than 1-NFE: split the two-jump sampler into its halves (docs/ABLATIONS.md).

For each run directory (a finished 2-D run) this prints, against held-out data and with the same
noise for every sampler:

* ``1nfe``: x = e - u(e, 0, 1);  ``2nfe``: the two jumps 1 -> 0.5 -> 0;
* ``half1``: the first jump z = e - 0.5 u(e, 0.5, 1) against the true marginal at t = 0.5,
  z_0.5 = 0.5 x + 0.5 e' (x held-out data, e' fresh noise): how far the first jump lands off;
* ``half2``: the second jump x = z - 0.5 u(z, 0, 0.5) started from the TRUE z_0.5: the second
  jump's own error, without the first jump's.

    python scripts/two_step_analysis.py RUN [RUN ...] [--num 2000] [--seed 1]
"""
from __future__ import annotations

import argparse
import json

import torch

from meanflow.config import load_config
from meanflow.data import load_dataset
from meanflow.metrics.pointcloud import histogram_tv, sliced_wasserstein
from meanflow.models.loading import load_model
from meanflow.runtime.checkpoint import resolve_checkpoint


def jump(model, z: torch.Tensor, r: float, t: float) -> torch.Tensor:
    """z - (t - r) u(z, r, t) for a batch z (N, D)."""
    ones = torch.ones(z.shape[0])
    return z - (t - r) * model(z, ones * r, ones * t)


def scores(x: torch.Tensor, ref: torch.Tensor, seed: int) -> dict[str, float]:
    return {"sliced_w2": round(sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(seed)), 4),
            "histogram_tv": round(histogram_tv(x, ref), 4)}


@torch.no_grad()
def analyse(run: str, num: int, seed: int) -> dict[str, dict[str, float]]:
    model, _ = load_model(resolve_checkpoint(run), ema=True)
    cfg = load_config(f"{run}/config.yaml")
    _, reference = load_dataset(cfg.data, cfg.seed)
    ref, _ = reference.get(torch.arange(min(num, len(reference))))
    gen = torch.Generator().manual_seed(seed)
    noise, other = torch.randn(ref.shape, generator=gen), torch.randn(ref.shape, generator=gen)
    true_half = 0.5 * ref + 0.5 * other
    half = jump(model, noise, 0.5, 1.0)
    return {
        "1nfe": scores(jump(model, noise, 0.0, 1.0), ref, seed),
        "2nfe": scores(jump(model, half, 0.0, 0.5), ref, seed),
        "half1": scores(half, true_half, seed),
        "half2": scores(jump(model, true_half, 0.0, 0.5), ref, seed),
        "half1_floor": scores(0.5 * ref.roll(1, 0) + 0.5 * torch.randn(ref.shape, generator=gen), true_half, seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps({"run": run, **analyse(run, args.num, args.seed)}))


if __name__ == "__main__":
    main()
