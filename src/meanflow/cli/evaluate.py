"""``meanflow eval``: score a trained run or checkpoint; metrics JSON to stdout (and --out)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation import evaluate_run
from ..runtime import distributed as D
from ..runtime.distributed import process_rank
from ..sampling import METHODS


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model (metrics as JSON)", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (newest checkpoint)")
    src.add_argument("--checkpoint", help="checkpoint directory, or released iMF weights (iMF-B-2.pth; needs --fid-stats)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="NFE values to evaluate (default: config eval.steps)")
    p.add_argument("--num", type=int, default=None, help="number of samples (default: config eval.num_samples)")
    p.add_argument("--method", default=None, choices=METHODS, help="only this sampler (default: MeanFlow + ODE baseline)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA (default: the run's eval.ema)")
    p.add_argument("--fid-stats", default=None, metavar="REF.npz", help="reference statistics (mu, sigma) for FID / IS with Inception features")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="pt_inception-2015-12-05 weights file (or env MEANFLOW_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=None, help="sampling batch size (default: config eval.batch_size)")
    p.add_argument("--save-samples", default=None, metavar="STEM", help="also write image samples to STEM_<method>_<k>nfe.npz (uint8 NHWC)")
    p.add_argument("--omega", type=float, default=None, help="guidance scale of an iMF model (> 0; default: the preset's official value, else 1)")
    p.add_argument("--interval", type=float, nargs=2, default=None, metavar=("T_MIN", "T_MAX"),
                   help="guidance interval of an iMF model, 0 <= T_MIN <= T_MAX <= 1 (default: the preset's official one, else 0 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = D.setup(args.device)  # under torchrun: the process group, destroyed before exit (a live gloo group can abort the exit)
    try:
        metrics = evaluate_run(args.run or args.checkpoint, steps=args.steps, num=args.num, seed=args.seed,
                               ema=False if args.raw else None, info=info, method=args.method, fid_stats=args.fid_stats,
                               inception_weights=args.inception_weights, batch_size=args.batch_size,
                               save_samples=args.save_samples, omega=args.omega, interval=args.interval)
    finally:
        D.teardown()
    if process_rank() != 0:
        return 0
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
