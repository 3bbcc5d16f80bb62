"""`meanflow report`: a trained run's log carries the per-bin diagnostics and renders to one PNG."""
from __future__ import annotations

import json

from PIL import Image

from meanflow.cli import main
from meanflow.evaluation.report import heat_map, metrics_lines, read_log


def test_run_logs_time_bins_and_report_renders(tmp_path, tiny_toy_overrides):
    run = tmp_path / "run"
    overrides = [*tiny_toy_overrides, "train.steps=20", "train.log_every=5", "eval.baseline_ode_steps=4"]
    assert main(["train", "--out", str(run), *overrides]) == 0
    records = read_log(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(len(r["mse_by_t"]) == 8 and len(r["loss_by_h"]) == 8 for r in records)
    steps, values = heat_map(records, "mse_by_t")
    assert values.shape == (4, 8) and list(steps) == [5, 10, 15, 20]
    assert {"loss_fm", "loss_mf", "dudt_abs_mean", "grad_norm", "bad_steps"} <= records[-1].keys()
    assert any(line.startswith("meanflow_1nfe (1 NFE): sliced_w2") for line in metrics_lines(run))

    with (run / "log.jsonl").open("a") as handle:  # a resumed run logs step 20 again: the newest record wins
        handle.write(json.dumps({**records[-1], "loss": 123.0}) + "\n")
    assert read_log(run)[-1]["loss"] == 123.0 and len(read_log(run)) == 4

    assert main(["report", str(run)]) == 0
    width, height = Image.open(run / "report.png").size
    assert width > 800 and height > 800


def test_report_of_a_folder_without_log_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "log.jsonl does not exist" in capsys.readouterr().err
