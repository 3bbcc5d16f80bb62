"""The pMF presets: the official recipes' numbers, dry runs, and pixel objectives refused on VAE latents."""
from __future__ import annotations

import pytest

from meanflow.cli import main
from meanflow.config import ConfigError, load_config

# model, image size, mu, omega_beta, uniform share, perceptual bound, sampling omega, interval (official configs/pMF_*.yml)
OFFICIAL = {
    "imagenet-pmf-b16": ("pmf-b/16", 256, 0.8, 1.0, 0.0, 0.8, 8.5, [0.1, 0.7]),
    "imagenet-pmf-l16": ("pmf-l/16", 256, 0.8, 2.0, 0.0, 0.8, 7.0, [0.2, 0.7]),
    "imagenet-pmf-h16": ("pmf-h/16", 256, 0.0, 1.0, 0.1, 0.6, 7.0, [0.2, 0.6]),
    "imagenet-pmf-b32": ("pmf-b/32", 512, 0.8, 1.0, 0.0, 0.8, 6.5, [0.1, 0.7]),
    "imagenet-pmf-l32": ("pmf-l/32", 512, 0.0, 1.0, 0.0, 0.6, 7.5, [0.2, 0.6]),
    "imagenet-pmf-h32": ("pmf-h/32", 512, 0.0, 1.0, 0.1, 0.6, 5.5, [0.1, 0.6]),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_imagenet_presets_hold_the_official_recipe_and_dry_run(name, capsys):
    model, size, mu, beta, uniform, max_t, omega, interval = OFFICIAL[name]
    cfg = load_config(name)
    o, t = cfg.objective, cfg.train
    assert (cfg.model.name, cfg.data.name, cfg.data.image_size, cfg.data.flip) == (model, "folder", size, False)
    assert (o.kind, o.mu, o.sigma, o.omega_beta, o.omega_max, o.ratio, o.label_drop) == ("pmf", mu, 0.8, beta, 7.0, 0.5, 0.1)
    assert (o.uniform_fraction, o.perceptual_max_t, o.lpips_weight, o.convnext_weight) == (uniform, max_t, 0.4, 0.1)
    assert (o.weight_power, o.weight_eps, o.perceptual_weights) == (1.0, 0.01, "pretrained")
    assert (t.optimizer, t.lr, t.betas, t.weight_decay, t.warmup_steps, t.batch_size) == ("muon", 1e-3, [0.9, 0.95], 0.0, 0, 1024)
    assert (t.muon_momentum, t.muon_ns_steps, t.muon_adjust_lr) == (0.95, 5, "original")
    assert t.steps == 320 * (1_281_167 // 1024)
    assert t.ema_decays == pytest.approx([0.5 ** (1024 / (k * 1000)) for k in (500, 1000, 2000)], abs=1e-6) and t.ema_rampup == 0.05
    assert (cfg.eval.omega, cfg.eval.interval) == (omega, interval)
    assert main(["train", "--config", name, "--dry-run"]) == 0
    assert "kind: pmf" in capsys.readouterr().out


def test_digits_preset_trains_pixels_comparably_with_digits_and_digits_imf(capsys):
    cfg, imf = load_config("digits-pmf"), load_config("digits-imf")
    assert (cfg.objective.kind, cfg.data.name, cfg.train.optimizer, cfg.objective.lpips_weight) == ("pmf", "digits", "muon", 0.0)
    assert (cfg.train.batch_size, cfg.train.ema_decays, cfg.eval.num_samples) == (imf.train.batch_size, imf.train.ema_decays, imf.eval.num_samples)
    assert main(["train", "--config", "digits-pmf", "--dry-run"]) == 0


def test_a_pixel_objective_on_vae_latents_is_refused():
    with pytest.raises(ConfigError, match="pixel space without a VAE.*data.name=latents"):
        load_config("imagenet-pmf-b16", ["data.name=latents", "data.path=cache"])
    with pytest.raises(ConfigError, match="pixel space"):
        load_config("imagenet-imf-b2", ["objective.kind=pmf"])
