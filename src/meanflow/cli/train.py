"""``meanflow train``: train a config (preset name or YAML) with ``key=value`` overrides."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from ..config import available_configs, load_config
from ..data import check_keys_read
from ..evaluation import evaluate_run
from ..runtime.distributed import DistInfo, process_rank
from ..training.trainer import train


DEFAULT_CONFIG = "toy"


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MeanFlow / Flow Matching model", description=__doc__)
    p.add_argument("--config", default=None,
                   help=f"preset name ({', '.join(available_configs())}) or a YAML file (default: {DEFAULT_CONFIG})")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its newest complete checkpoint")
    p.add_argument("--init", default=None, metavar="PATH_OR_RUN",
                   help="start from these weights (run/checkpoint dir or any from_pretrained format); init.ema=false takes the raw weights")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=2000 objective.kind=flow_matching")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.resume:
        _check_resume_flags(args)
        out = Path(args.resume)
        source = out / "config.yaml"
        if not source.exists():
            raise FileNotFoundError(f"--resume {out}: no config.yaml there (is it a run directory?)")
        cfg = load_config(str(source), args.overrides)
    else:
        name = args.config or DEFAULT_CONFIG
        overrides = [*args.overrides, f"init.path={args.init}"] if args.init else args.overrides
        cfg = load_config(name, overrides)
        out = Path(args.out or Path("runs") / Path(name).stem)
    check_keys_read(cfg.data)
    if args.dry_run:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    train(cfg, out, resume=bool(args.resume))
    if not args.no_eval and process_rank() == 0:
        finish_run(out)
    return 0


def _check_resume_flags(args: argparse.Namespace) -> None:
    """--config, --out and --init would be ignored by --resume (the run keeps its own config, directory and weights)."""
    given = [flag for flag, value in (("--config", args.config), ("--out", args.out), ("--init", args.init)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} cannot be combined with --resume {args.resume}: a resumed run keeps its "
                         f"directory and its config.yaml; drop {' and '.join(given)} (change settings with key=value overrides)")


def finish_run(out: Path) -> None:
    """Write ``metrics.json`` and ``samples.png`` (1 NFE, 2 NFE and the ODE beside the data); print the metrics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preview = out / "samples.png"
    metrics = evaluate_run(out, info=DistInfo(device=device), preview=preview, allow_unscored=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(metrics["note"] if "note" in metrics else json.dumps(metrics["results"], indent=2))
    print(f"run directory: {out}  (preview: {preview}, metrics: {out / 'metrics.json'})")

