"""The EMA profiles against closed forms: the ramp-up's harmonic-number weights, the power function's
polynomial weights, EDM2's std <-> gamma table, and the share of the initial weights in each.

A one-parameter module is driven through a known sequence theta_0 (the initialisation), theta_1, ...;
the EMA after K updates must equal the weighted average of that sequence computed here in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from meanflow.config import ConfigError, load_config
from meanflow.training.builders import ema_profiles
from meanflow.training.ema import EMA, Exponential, PowerFunction, gamma_to_std, std_to_gamma


class Scalar(nn.Module):
    """One parameter, set by hand."""

    def __init__(self, value: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([value]))


def _average(profile, thetas: list[float]) -> float:
    """The EMA of ``profile`` started at thetas[0] and updated with thetas[1], thetas[2], ... (steps 1, 2, ...)."""
    model = Scalar(thetas[0])
    ema = EMA(model, [profile])
    for step, value in enumerate(thetas[1:], start=1):
        model.theta.data.fill_(value)
        ema.update(model, step)
    return float(ema.state_dict()["theta"])


def _harmonic(n: int) -> float:
    return sum(1.0 / j for j in range(1, n + 1))


def test_without_ramp_up_the_initialisation_keeps_decay_to_the_k():
    """The plain EMA (rampup 0): 0.999 ** 1200 = 30% of the average is still the initial weights."""
    share = _average(Exponential(0.999), [1.0] + [0.0] * 1200)
    assert share == pytest.approx(0.999 ** 1200, rel=1e-4) and share > 0.3


def test_the_ramp_up_share_of_the_initialisation_is_a_harmonic_power_then_the_decay():
    """Steps 1-3 ramp (0.5 ** (1/k) < 0.8 for k <= 3), then the cap: share = 0.5 ** (H_3 / 1) * 0.8 ** (K - 3)."""
    assert _average(Exponential(0.8, rampup=1.0), [1.0] + [0.0] * 3) == pytest.approx(0.5 ** _harmonic(3), rel=1e-6)
    assert _average(Exponential(0.8, rampup=1.0), [1.0] + [0.0] * 10) == pytest.approx(0.5 ** _harmonic(3) * 0.8 ** 7, rel=1e-5)
    # the trainer's default ramp-up: after one step the initialisation holds 0.5 ** 20 of the average, and less later
    assert _average(Exponential(0.999, rampup=0.05), [1.0, 0.0]) == pytest.approx(0.5 ** 20, rel=1e-5)
    assert _average(Exponential(0.999, rampup=0.05), [1.0] + [0.0] * 1200) < 1e-30


def test_the_ramped_average_of_a_known_sequence_has_harmonic_weights():
    """theta_k = k while rampup * k stays below the half-life: step i weighs (1 - 0.5 ** (1 / (r i))) 0.5 ** ((H_K - H_i) / r)."""
    r, steps = 0.5, 12
    expected = sum(i * (1 - 0.5 ** (1 / (r * i))) * 0.5 ** ((_harmonic(steps) - _harmonic(i)) / r) for i in range(1, steps + 1))
    assert _average(Exponential(0.99, rampup=r), [0.0] + [float(k) for k in range(1, steps + 1)]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 3.0, 6.94])
def test_the_power_function_average_weighs_step_i_by_a_difference_of_powers(gamma):
    """After K steps the power-function EMA is sum_i theta_i (i^(g+1) - (i-1)^(g+1)) / K^(g+1), with no share of theta_0
    (gamma = 0: the plain mean of the steps)."""
    steps = 15
    thetas = [1000.0] + [float(k) ** 2 for k in range(1, steps + 1)]
    weights = np.array([i ** (gamma + 1) - (i - 1) ** (gamma + 1) for i in range(1, steps + 1)]) / steps ** (gamma + 1)
    expected = float(np.dot(weights, thetas[1:]))
    assert _average(PowerFunction(gamma_to_std(gamma)), thetas) == pytest.approx(expected, rel=1e-5)
    if gamma == 0.0:
        assert expected == pytest.approx(np.mean(thetas[1:]))


def test_std_and_gamma_follow_edm2():
    """EDM2's pairs (std 0.05 -> gamma 16.97, 0.10 -> 6.94), the round trip, and gamma = 0 at the widest std."""
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.005) and std_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for gamma in (0.5, 4.0, 40.0):
        assert std_to_gamma(gamma_to_std(gamma)) == pytest.approx(gamma, rel=1e-9)
    assert gamma_to_std(0.0) == pytest.approx(math.sqrt(1 / 12)) and std_to_gamma(math.sqrt(1 / 12)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"std must be in \(0, 0.2887\]"):
        PowerFunction(0.3)


def test_the_config_builds_the_profiles_and_names_their_files():
    train = load_config("toy", ["train.ema_decays=[0.99, 0.9]", "train.ema_stds=[0.05]", "train.ema_rampup=0.1"]).train
    profiles = ema_profiles(train)
    assert profiles == [Exponential(0.99, 0.1), Exponential(0.9, 0.1), PowerFunction(0.05)]
    assert EMA(nn.Linear(1, 1), profiles).file_names() == ["ema.safetensors", "ema_0.9.safetensors", "ema_std0.05.safetensors"]
    assert ema_profiles(load_config("toy", ["train.ema_decays=[]", "train.ema_stds=[0.1]"]).train) == [PowerFunction(0.1)]
    assert load_config("toy").train.ema_rampup == 0.05  # EDM's ramp-up is the default


@pytest.mark.parametrize("override, message", [
    (["train.ema_decays=[]"], "train.ema_decays and train.ema_stds are both empty"),
    (["train.ema_stds=[0.5]"], r"train.ema_stds must be a list of numbers in \(0, 0.2887\]"),
    (["train.ema_decays=[1.0]"], r"train.ema_decays must be a list of numbers in \(0, 1\)"),
    (["train.ema_rampup=-0.1"], r"train.ema_rampup must be in \[0, 1\]"),
])
def test_bad_ema_settings_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy", override)
