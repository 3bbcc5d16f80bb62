"""Image runs through the CLI: train a few steps on digits, sample .npz / .png, evaluate."""
import json

import numpy as np
import pytest
from PIL import Image

from meanflow.cli import main

TINY_DIGITS = ["--config", "digits", "--no-eval", "train.steps=2", "train.batch_size=8", "train.checkpoint_every=2",
               "train.sample_every=2", "train.log_every=1", "train.device=cpu", "model.kwargs={model_channels: 8, attn_resolutions: []}"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--out", str(run), *TINY_DIGITS]) == 0
    return run


def test_training_writes_sample_grids_and_checkpoint(digits_run):
    grids = sorted((digits_run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000002.png"]
    assert Image.open(grids[0]).size[0] > 32
    assert (digits_run / "checkpoints" / "step_00000002" / "ema_0.9999.safetensors").exists()


def test_sample_npz_uint8_nhwc_with_requested_labels(digits_run, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--run", str(digits_run), "--steps", "2", "--num", "12", "--labels", "3,5", "--out", str(out)]) == 0
    data = np.load(out)
    assert data["samples"].dtype == np.uint8 and data["samples"].shape == (12, 8, 8, 1)
    assert data["labels"].tolist() == [3, 5] * 6


def test_sample_png_grid(digits_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(digits_run), "--num", "20", "--class", "7", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 16


def test_eval_reports_digits_metrics(digits_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", "--run", str(digits_run), "--steps", "1", "--num", "40", "--method", "meanflow", "--out", str(out),
                 "--save-samples", str(tmp_path / "s")]) == 0
    saved = np.load(tmp_path / "s_meanflow_1nfe.npz")
    assert saved["samples"].shape == (40, 8, 8, 1) and saved["samples"].dtype == np.uint8 and saved["labels"].shape == (40,)
    metrics = json.loads(out.read_text())
    entry = metrics["results"]["meanflow_1nfe"]
    assert 0.0 <= entry["class_accuracy"] <= 1.0 and entry["digits_fd"] > 0
    assert metrics["weights"] == "ema"


@pytest.mark.heavy
def test_eval_split_over_two_processes_matches_one(digits_run, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import free_port

    args = ["eval", "--run", str(digits_run), "--steps", "1", "--num", "48", "--batch-size", "16", "--method", "meanflow"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "meanflow", *args, "--out", str(tmp_path / "one.json")], check=True, env=env, capture_output=True)
    # "--" stops torchrun's parser from reading --run / --num as abbreviations of its own options
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "meanflow", "--"]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two.json")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = one["results"]["meanflow_1nfe"], two["results"]["meanflow_1nfe"]
    assert a["class_accuracy"] == b["class_accuracy"]
    assert abs(a["digits_fd"] - b["digits_fd"]) < 1e-6 * max(1.0, a["digits_fd"])
