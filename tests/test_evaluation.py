"""Evaluation of a run reads the run's own eval settings; labelled points are sampled and scored per class."""
from __future__ import annotations

import pytest
import torch

from meanflow.cli import main
from meanflow.evaluation import evaluate_points, evaluate_run
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


class ClassCentres(torch.nn.Module):
    """u(z, r, t | y) = z - centre[y]: one MeanFlow jump from t = 1 to r = 0 lands exactly on centre[y] (1-D);
    no label (the null class 2) lands on 1."""

    num_classes = 2

    def __init__(self, centres: list[float]):
        super().__init__()
        self.register_buffer("centres", torch.tensor([*centres, 1.0])[:, None])

    def forward(self, z, r, t, labels=None):
        labels = torch.full_like(r, self.num_classes, dtype=torch.long) if labels is None else labels
        return z - self.centres[labels]


def test_labelled_points_are_sampled_per_class_and_scored_per_class():
    labels = torch.tensor([0, 1] * 20)
    reference = torch.tensor([[-1.0], [3.0]])[labels]  # class 0 at -1, class 1 at 3
    plan = [("meanflow", 1)]
    right = evaluate_points(ClassCentres([-1.0, 3.0]), reference, plan, 40, 0, reference_labels=labels)["meanflow_1nfe"]
    assert right["sliced_w2"] == pytest.approx(0.0, abs=1e-6) and right["class_sliced_w2"] == pytest.approx(0.0, abs=1e-6)
    swapped = evaluate_points(ClassCentres([3.0, -1.0]), reference, plan, 40, 0, reference_labels=labels)["meanflow_1nfe"]
    # the same marginal, every sample on the other class's point: in 1-D each class term is the exact W2, 4
    assert swapped["sliced_w2"] == pytest.approx(0.0, abs=1e-6) and swapped["class_sliced_w2"] == pytest.approx(4.0, rel=1e-6)
    unlabelled = evaluate_points(ClassCentres([-1.0, 3.0]), reference, plan, 40, 0)["meanflow_1nfe"]
    assert "class_sliced_w2" not in unlabelled and unlabelled["sliced_w2"] == pytest.approx(2.0, rel=1e-6)  # all on 1
