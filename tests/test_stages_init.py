"""Multi-stage schedules in one config and ``train --init`` (weights and EMAs, no optimizer state)."""
from __future__ import annotations

import json

import pytest
import torch

from meanflow.config import ConfigError, load_config, stage_objectives
from meanflow.models.loading import load_model
from meanflow.runtime import checkpoint as ckpt
from meanflow.training.trainer import train

TWO_STAGES = "stages=[{steps: 2, objective: {kind: flow_matching}}, {objective: {ratio: 0.5, omega: 1.0}}]"


def toy(tmp_path, *extra):
    return load_config("toy", ["model.kwargs={width: 32, depth: 2}", "data.num_samples=1024", "data.holdout=128",
                               "train.batch_size=32", "train.log_every=1", "train.steps=4", "train.checkpoint_every=2",
                               "train.keep_checkpoints=5", *extra])


def test_stage_plan_and_its_errors(tmp_path):
    cfg = toy(tmp_path, TWO_STAGES)
    (start0, first), (start1, second) = stage_objectives(cfg)
    assert (start0, first.kind, start1, second.kind) == (0, "flow_matching", 2, "meanflow")
    assert second.ratio == 0.5 and first.weight_power == 0.0  # flow_matching's own default, not the run's p
    assert stage_objectives(toy(tmp_path))[0][1] is not None
    for bad, message in [
        ("stages=[{steps: 3, objective: {}}, {steps: 3, objective: {}}]", "add up to 6"),
        ("stages=[{objective: {}}, {objective: {}}]", r"stages\[0\].steps is required"),
        ("stages=[{steps: 4, objectiv: {}}]", "keys steps and objective"),
        ("stages=[{steps: 4, objective: {ration: 0.5}}]", r"stages\[0\].objective"),
    ]:
        with pytest.raises(ConfigError, match=message):
            toy(tmp_path, bad)


def test_each_stage_trains_with_its_objective(tmp_path):
    run = train(toy(tmp_path, TWO_STAGES), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"frac_jvp"' in line]
    assert [r["frac_jvp"] for r in rows] == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("use_ema", [True, False])
def test_init_takes_weights_and_emas_but_not_the_optimizer(tmp_path, use_ema):
    source = train(toy(tmp_path, "train.ema_decays=[0.5]"), tmp_path / "source")
    wanted, _ = load_model(source, ema=use_ema)
    cfg = toy(tmp_path, f"init.path={source}", f"init.ema={'true' if use_ema else 'false'}", "train.steps=1",
              "train.lr=1.0e-30", "train.warmup_steps=0", "train.ema_decays=[0.9, 0.99]")
    run = train(cfg, tmp_path / "run")
    step = ckpt.latest_checkpoint(run / "checkpoints")
    for name in ("model.safetensors", "ema.safetensors", "ema_0.99.safetensors"):
        got = ckpt.read_weights(step / name)
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in wanted.state_dict().items()), name
    state = ckpt.read_state(step)
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())  # a fresh Adam, one update old


def test_init_of_another_model_is_a_config_error_before_training(tmp_path):
    source = train(toy(tmp_path), tmp_path / "source")
    with pytest.raises(ConfigError, match=r"does not fit the configured model MLP \(.*wrong shapes: .*model \(64,"):
        train(toy(tmp_path, f"init.path={source}", "model.kwargs={width: 64, depth: 2}"), tmp_path / "run")
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    with pytest.raises(ConfigError, match="init.path"):
        train(toy(tmp_path, f"init.path={tmp_path / 'nothing'}"), tmp_path / "run2")
