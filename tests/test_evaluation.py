"""Evaluation of a run reads the run's own eval settings."""
from __future__ import annotations

from meanflow.cli import main
from meanflow.evaluation import evaluate_run
from meanflow.runtime.distributed import DistInfo

TINY = ["model.kwargs={width: 16, depth: 1}", "data.num_samples=256", "data.holdout=64", "train.batch_size=32",
        "train.steps=2", "train.checkpoint_every=2", "eval.num_samples=64", "eval.steps=[1]"]


def test_eval_ema_false_scores_the_raw_weights(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-eval", *TINY, "eval.ema=false"]) == 0
    raw = evaluate_run(run, info=DistInfo())
    ema = evaluate_run(run, ema=True, info=DistInfo())
    assert raw["weights"] == "raw" and ema["weights"] == "ema"
    assert raw["results"]["meanflow_1nfe"]["sliced_w2"] != ema["results"]["meanflow_1nfe"]["sliced_w2"]
