"""Sampling with guidance as an input (iMF-style models): defaults per preset, checks, and the flags reaching the model."""
from __future__ import annotations

import math

import pytest
import torch

import meanflow
import meanflow.evaluation.preview as preview_module
import meanflow.evaluation.run as run_module
from meanflow.config import ConfigError, load_config
from meanflow.data.base import TensorDataset
from meanflow.evaluation.preview import save_preview
from meanflow.models import create
from meanflow.sampling import generate, guidance_inputs
from meanflow.training.trainer import train


def imf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create("imf-tiny/2", in_channels=1, input_size=4, num_classes=3, v_head=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_official_settings_are_the_defaults():
    with torch.device("meta"):
        models = {name: create(name, v_head=False) for name in ("imf-b/2", "imf-xl/2")}
    assert guidance_inputs(models["imf-b/2"], 1) == {"omega": 8.0, "t_min": 0.4, "t_max": 0.65}
    assert guidance_inputs(models["imf-xl/2"], 1) == {"omega": 8.0, "t_min": 0.42, "t_max": 0.62}
    assert guidance_inputs(models["imf-xl/2"], 2) == {"omega": 4.0, "t_min": 0.36, "t_max": 0.64}
    assert guidance_inputs(models["imf-xl/2"], 2, omega=3.0) == {"omega": 3.0, "t_min": 0.36, "t_max": 0.64}
    assert guidance_inputs(models["imf-b/2"], 1, interval=(0.0, 1.0)) == {"omega": 8.0, "t_min": 0.0, "t_max": 1.0}
    assert guidance_inputs(imf_model(), 1) == {"omega": 1.0, "t_min": 0.0, "t_max": 1.0}  # no released settings: unguided


@pytest.mark.parametrize("omega, interval, message", [
    (0.0, None, "omega must be a number > 0"), (-2.0, None, "omega must be a number > 0"), (math.nan, None, "omega must be"),
    (None, (-0.1, 0.5), "0 <= t_min <= t_max <= 1"), (None, (0.2, 1.1), "0 <= t_min <= t_max <= 1"),
    (None, (0.7, 0.3), "0 <= t_min <= t_max <= 1"),
])
def test_bad_guidance_is_refused(omega, interval, message):
    with pytest.raises(ValueError, match=message):
        meanflow.sample(imf_model(), torch.randn(2, 1, 4, 4), omega=omega, interval=interval)


def test_guidance_for_a_model_that_has_it_in_its_weights_is_an_error():
    dit = create("dit-tiny/2", in_channels=1, input_size=4, num_classes=3)
    for kwargs in ({"omega": 2.0}, {"interval": (0.1, 0.9)}):
        with pytest.raises(ValueError, match="guidance_input"):
            meanflow.sample(dit, torch.randn(2, 1, 4, 4), **kwargs)
        with pytest.raises(ValueError, match="guidance_input"):
            generate(dit, 2, (1, 4, 4), num_classes=3, **kwargs)
    assert meanflow.sample(dit, torch.randn(2, 1, 4, 4), labels=torch.tensor([0, 1])).shape == (2, 1, 4, 4)


def test_omega_and_interval_reach_every_network_call():
    model, noise, y = imf_model(), torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append({k: kwargs[k] for k in ("omega", "t_min", "t_max")}), with_kwargs=True)
    meanflow.sample(model, noise, steps=2, labels=y, omega=3.0, interval=(0.2, 0.8))
    meanflow.ode_sample(model, noise, steps=3, labels=y, omega=2.5, interval=(0.1, 0.6))
    hook.remove()
    assert calls == [{"omega": 3.0, "t_min": 0.2, "t_max": 0.8}] * 2 + [{"omega": 2.5, "t_min": 0.1, "t_max": 0.6}] * 3
    expected = model(noise, torch.zeros(4), torch.ones(4), y, omega=torch.full((4,), 3.0), t_min=torch.full((4,), 0.2), t_max=torch.full((4,), 0.8))
    torch.testing.assert_close(meanflow.sample(model, noise, labels=y, omega=3.0, interval=(0.2, 0.8)), noise - expected, rtol=0, atol=0)
    guided, plain = (generate(model, 6, (1, 4, 4), num_classes=3, omega=w)[0] for w in (4.0, None))
    assert (guided - plain).abs().max() > 1e-4


def test_eval_omega_and_interval_of_the_config_reach_the_evaluation(tmp_path, monkeypatch):
    cfg = load_config("digits-imf", ["train.steps=1", "train.batch_size=8", "train.checkpoint_every=0", "train.log_every=1",
                                     "eval.omega=3.0", "eval.interval=[0.2, 0.7]"])
    out = train(cfg, tmp_path / "run")
    seen: dict = {}
    monkeypatch.setattr(run_module, "evaluate_images", lambda *args, **kwargs: seen.update(kwargs) or {})
    run_module.evaluate_run(out)
    assert (seen["omega"], seen["interval"]) == (3.0, [0.2, 0.7])
    run_module.evaluate_run(out, omega=2.0, interval=(0.0, 1.0))  # the eval command's flags win over the config
    assert (seen["omega"], seen["interval"]) == (2.0, (0.0, 1.0))


def test_previews_of_training_and_evaluation_use_the_eval_guidance(tmp_path, monkeypatch):
    seen = []
    real = preview_module.generate
    monkeypatch.setattr(preview_module, "generate", lambda *a, **k: seen.append((k["omega"], k["interval"])) or real(*a, **k))
    cfg = load_config("digits-imf", ["train.steps=1", "train.batch_size=8", "train.checkpoint_every=1", "train.log_every=1",
                                     "train.sample_every=1", "eval.baseline_ode_steps=2", "eval.omega=3.0", "eval.interval=[0.2, 0.7]"])
    out = train(cfg, tmp_path / "run")
    assert seen == [(3.0, [0.2, 0.7])] * 3  # the training preview: 1 NFE, 2 NFE, the ODE
    monkeypatch.setattr(run_module, "evaluate_images", lambda *args, **kwargs: {})
    run_module.evaluate_run(out, preview=tmp_path / "p.png", omega=2.0)
    assert seen[3:] == [(2.0, [0.2, 0.7])] * 3
    data = TensorDataset(torch.zeros(6, 1, 4, 4), torch.arange(6) % 3, kind="images", num_classes=3)
    guided, plain = (save_preview(imf_model(), data, tmp_path / f"{w}.png", num=6, plan=(("meanflow", 1),), omega=w)
                     for w in (4.0, None))
    assert guided.read_bytes() != plain.read_bytes()


def test_eval_guidance_keys_are_checked_before_training(tmp_path):
    with pytest.raises(ConfigError, match="eval.omega must be a number"):
        load_config("digits-imf", ["eval.omega=strong"])
    with pytest.raises(ConfigError, match=r"eval.interval must be two numbers"):
        load_config("digits-imf", ["eval.interval=[0.2]"])
    with pytest.raises(ValueError, match="omega / interval are inputs of iMF-style models"):
        train(load_config("toy", ["train.steps=1", "eval.omega=2.0"]), tmp_path / "toy")
    with pytest.raises(ValueError, match="0 <= t_min <= t_max <= 1"):
        train(load_config("digits-imf", ["train.steps=1", "eval.interval=[0.8, 0.3]"]), tmp_path / "imf")
    assert not list(tmp_path.glob("*/checkpoints/*"))  # refused before any training step
