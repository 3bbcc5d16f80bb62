"""Name -> constructor registry for every model preset, with the facts of its family.

A family (:class:`Family`) says what its presets take as input (``"points"``: vectors (B, D);
``"images"``: square images or latents (B, C, H, H)), which constructor arguments come from the
data, the sizes ``meanflow models`` shows it at, and whether it takes the fast JVP path. Builders,
the CLI and the tests read these facts here instead of guessing from preset names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


def points_kwargs(sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Data-derived arguments of a point model: ``dim`` = D of samples (D,), and ``num_classes``."""
    if len(sample_shape) != 1:
        raise ValueError(f"takes vectors of shape (N, D) but the data samples have shape {sample_shape}")
    return {"dim": sample_shape[0], "num_classes": num_classes}


def image_kwargs(sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """Data-derived arguments of an image model: ``in_channels``, ``input_size`` of (C, H, H), ``num_classes``."""
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ValueError(f"takes square images (C, H, H) but the data samples have shape {sample_shape}")
    return {"in_channels": sample_shape[0], "input_size": sample_shape[1], "num_classes": num_classes}


# input kind -> the data-derived constructor arguments it takes
INPUT_KINDS: dict[str, Callable[[tuple[int, ...], int], dict[str, Any]]] = {"points": points_kwargs, "images": image_kwargs}


@dataclass(frozen=True)
class Family:
    """Facts shared by the presets of one model class.

    ``example``: constructor arguments the family is shown and smoke-tested at (for image
    families: ``in_channels``, ``input_size``, ``num_classes``; for point families: ``dim``).
    """

    cls: type[nn.Module]
    input_kind: str
    example: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {', '.join(INPUT_KINDS)}; got {self.input_kind!r}")

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def fast_jvp(self) -> bool:
        """Whether the models take Dual inputs (the one-pass row-subset JVP), not forward-mode AD."""
        return bool(getattr(self.cls, "supports_dual", False))

    def data_kwargs(self, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """Constructor arguments taken from the data (samples of ``sample_shape``, ``num_classes`` classes)."""
        return INPUT_KINDS[self.input_kind](tuple(sample_shape), num_classes)

    def sample_shape(self, kwargs: dict[str, Any]) -> tuple[int, ...]:
        """Shape of one input sample for a model built with ``kwargs`` (family example where not given)."""
        args = {**self.example, **kwargs}
        if self.input_kind == "points":
            return (args["dim"],)
        size = args["input_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return (args["in_channels"], height, width)

    def example_input(self, kwargs: dict[str, Any], batch: int = 2, generator: torch.Generator | None = None):
        """(z, r, t, labels) for a model built with ``kwargs``: z (batch, *sample_shape), r <= t (batch,)."""
        args = {**self.example, **kwargs}
        z = torch.randn((batch, *self.sample_shape(kwargs)), generator=generator)
        t = torch.rand(batch, generator=generator)
        r = t * torch.rand(batch, generator=generator)
        classes = args.get("num_classes", 0)
        labels = torch.randint(0, classes, (batch,), generator=generator) if classes else None
        return z, r, t, labels


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[..., nn.Module]
    family: Family


_REGISTRY: dict[str, Preset] = {}


def register(name: str, family: Family) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a constructor under a lower-case preset name, with its family's facts."""
    if not isinstance(family, Family):
        raise TypeError(f"register({name!r}, family=...) needs a models.registry.Family, got {family!r}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[key] = Preset(key, fn, family)
        return fn

    return wrap


def available() -> list[str]:
    """Sorted list of model preset names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def preset(name: str) -> Preset:
    """The registered preset ``name`` (case-insensitive); ValueError listing the presets."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key]


def family(name: str) -> Family:
    """Facts of the family of preset ``name``."""
    return preset(name).family


def create(name: str, **kwargs) -> nn.Module:
    """Build a model by preset name, e.g. ``create("mlp", dim=2)`` or ``create("dit-b/4", ...)``.

    Every model is called as ``model(z, r, t, labels=None) -> u`` with ``r, t`` of shape (B,).
    """
    return preset(name).build(**kwargs)
