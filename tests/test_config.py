"""Configs: presets load, overrides are typed, and the CLI dry run prints the resolved config."""
import pytest
import torch

from meanflow.cli import main
from meanflow.config import ConfigError, available_configs, load_config
from meanflow.training.builders import build_optimizer


@pytest.mark.parametrize("name", available_configs())
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert cfg.train.steps > 0 and cfg.model.name


def test_overrides_are_typed_and_nested():
    cfg = load_config("toy", ["train.steps=7", "objective.kind=flow_matching", "train.betas=[0.9, 0.99]", "model.kwargs.width=8", "data.path=x.npy"])
    assert cfg.train.steps == 7 and cfg.objective.kind == "flow_matching"
    assert cfg.train.betas == [0.9, 0.99] and cfg.model.kwargs["width"] == 8 and cfg.data.path == "x.npy"


def test_paper_settings_in_presets():
    b4 = load_config("imagenet-b4")
    assert (b4.train.batch_size, b4.train.lr, b4.train.betas, b4.train.ema_decays) == (256, 1e-4, [0.9, 0.95], [0.9999])
    assert (b4.objective.mu, b4.objective.sigma, b4.objective.ratio, b4.objective.weight_power) == (-0.4, 1.0, 0.25, 1.0)
    c10 = load_config("cifar10")
    assert (c10.objective.time_sampler, c10.objective.ratio, c10.objective.weight_power) == ("cifar_v1", 0.75, 0.75)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("toy", ["train.steps"])


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--dry-run", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "name: checkerboard" in out


@pytest.mark.parametrize("name, cls", [("adam", "Adam"), ("adamw", "AdamW")])
def test_optimizer_names_build_that_optimizer_with_the_configured_settings(name, cls):
    cfg = load_config("toy", [f"train.optimizer={name}", "train.lr=0.003", "train.betas=[0.8, 0.9]", "train.weight_decay=0.01"])
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg.train)
    group = opt.param_groups[0]
    assert type(opt) is getattr(torch.optim, cls)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.003, (0.8, 0.9), 0.01)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config("toy", ["train.optimizer=sgd"])
