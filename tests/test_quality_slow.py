"""Release checks: the documented quality of the two main jobs, trained for real (``-m slow``).

Each test runs the exact command of docs/RESULTS.md and checks its ``metrics.json`` against a
threshold with a margin over the documented value; see docs/TESTING.md for the times and numbers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meanflow.cli import main

pytestmark = pytest.mark.slow


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["results"]


def test_toy_meanflow_one_step_quality(tmp_path):
    """`meanflow train` (toy checkerboard): 1-NFE MeanFlow close to the data, far ahead of one Euler step."""
    run = tmp_path / "toy"
    assert main(["train", "--out", str(run), "train.device=cpu"]) == 0
    results = _metrics(run)
    one_step = results["meanflow_1nfe"]
    # documented: sliced W2 0.068, histogram TV 0.225 (seed 0); the second recipe (per-sample velocity) gave
    # 0.0785 and 0.291, the first (p = 1, EMA 0.999) 0.127-0.145: their pictures fail the TV bound
    assert one_step["sliced_w2"] < 0.10 and one_step["histogram_tv"] < 0.27, one_step
    assert one_step["sliced_w2"] < 5 * results["data_floor"]["sliced_w2"]


def test_point_cloud_recipe_holds_on_ring_dot(tmp_path, monkeypatch):
    """The default recipe on a point cloud it was not tuned on (a thin ring around a dense dot), MeanFlow
    against Flow Matching with the same recipe: `meanflow sweep recipe-shapes`'s ring_dot pair, seed 0."""
    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "point_shapes.py"
    subprocess.run([sys.executable, str(script), "runs/shapes"], check=True, capture_output=True)
    shape = ["data.name=points", "data.path=runs/shapes/ring_dot.npy", "train.device=cpu"]
    assert main(["train", "--out", "mf", *shape]) == 0
    assert main(["train", "--out", "fm", *shape, "objective.kind=flow_matching"]) == 0
    one_step, flow = _metrics(tmp_path / "mf")["meanflow_1nfe"], _metrics(tmp_path / "fm")["euler_100nfe"]
    # documented: 0.0713 against 0.0686 (ratio 1.04); the second recipe (per-sample velocity) gave 2.15
    assert one_step["sliced_w2"] < 1.5 * flow["sliced_w2"], (one_step, flow)


def test_digits_one_step_class_accuracy_and_fd(tmp_path):
    """`meanflow train --config digits`: 1-NFE samples of the requested class, near the real digits."""
    run = tmp_path / "digits"
    assert main(["train", "--config", "digits", "--out", str(run), "train.device=cpu"]) == 0
    one_step = _metrics(run)["meanflow_1nfe"]
    assert one_step["class_accuracy"] >= 0.95 and one_step["digits_fd"] < 40, one_step  # documented: 1.000, 35.0 (seed 0)
