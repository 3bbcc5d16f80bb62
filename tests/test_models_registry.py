"""Model families carry their facts in the registry: input kind, data-derived arguments, an
example input, the fast JVP path. Checked against the models themselves."""
from __future__ import annotations

import pytest
import torch

from meanflow.config import ConfigError, ModelConfig
from meanflow.models import available, create
from meanflow.models.loading import model_spec
from meanflow.models.registry import Family, family, register

SMALLEST = {"MLP": "mlp", "DiT": "dit-tiny/2", "UNet": "unet-tiny", "IMFDiT": "imf-tiny/2", "MiT": "pmf-tiny/4"}


def test_every_preset_has_a_family_and_every_family_is_covered():
    assert {family(name).name for name in available()} == set(SMALLEST)


@pytest.mark.parametrize("name", sorted(SMALLEST.values()))
def test_example_input_runs_and_facts_match_the_model(name):
    fam = family(name)
    kwargs = {"input_size": 8, "in_channels": 1, "num_classes": 3} if fam.input_kind == "images" else {"dim": 3, "num_classes": 3}
    torch.manual_seed(0)
    model = create(name, **kwargs).eval()
    z, r, t, labels = fam.example_input(kwargs, batch=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, *fam.sample_shape(kwargs)) and bool((r <= t).all()) and labels.max() < 3
    assert model(z, r, t, labels).shape == z.shape
    assert fam.fast_jvp == bool(getattr(model, "supports_dual", False))
    assert isinstance(model, fam.cls)


def test_data_derived_arguments_come_from_the_family():
    assert model_spec(ModelConfig("mlp", {"width": 8}), (5,), 2) == {"name": "mlp", "kwargs": {"width": 8, "dim": 5, "num_classes": 2}}
    spec = model_spec(ModelConfig("unet-tiny"), (3, 16, 16), 0)
    assert spec["kwargs"] == {"in_channels": 3, "input_size": 16, "num_classes": 0}
    with pytest.raises(ConfigError, match=r"takes vectors.*use a model that takes images \(dit-\*, .*unet-\*\)"):
        model_spec(ModelConfig("mlp"), (1, 8, 8), 0)
    with pytest.raises(ConfigError, match=r"takes square images.*data.image_size"):
        model_spec(ModelConfig("dit-tiny/2"), (1, 8, 6), 0)


def test_a_new_family_needs_no_name_prefix(monkeypatch):
    """A preset named unlike any existing family is sized from the data by its registered facts."""
    from meanflow.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    fam = Family(create("mlp").__class__, input_kind="points", example={"dim": 2})
    register("my-vectors", fam)(lambda **kw: create("mlp", **kw))
    assert model_spec(ModelConfig("my-vectors"), (7,), 0)["kwargs"] == {"dim": 7, "num_classes": 0}
    with pytest.raises(TypeError, match="Family"):
        register("broken", None)
    with pytest.raises(ValueError, match="input_kind"):
        Family(fam.cls, input_kind="audio")


def test_mlp_fourier_features_are_fixed_saved_and_checked():
    plain = create("mlp", dim=2)
    assert not any("freqs" in key for key in plain.state_dict())  # the default keeps the earlier weight layout
    torch.manual_seed(1)
    a = create("mlp", dim=2, fourier_features=16, fourier_scale=2.0)
    torch.manual_seed(2)
    b = create("mlp", dim=2, fourier_features=16, fourier_scale=2.0)
    assert torch.equal(a.state_dict()["features.freqs"], b.state_dict()["features.freqs"])  # not drawn from the global RNG
    assert a.state_dict()["features.freqs"].shape == (2, 16) and a.inp.in_features == 2 + 32
    z = torch.randn(5, 2)
    features = a.features(z)
    torch.testing.assert_close(features[:, 18:], torch.cos(z @ a.features.freqs))
    with pytest.raises(ValueError, match="Fourier features need count >= 1 and scale > 0"):
        create("mlp", dim=2, fourier_features=4, fourier_scale=0.0)
