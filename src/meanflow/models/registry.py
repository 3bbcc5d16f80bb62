"""Name -> constructor registry for every model family (``meanflow.models.create``)."""
from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a constructor under a lower-case preset name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return wrap


def available() -> list[str]:
    """Sorted list of model preset names accepted by :func:`create`."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build a model by preset name, e.g. ``create("mlp", dim=2)`` or ``create("dit-b/4", ...)``.

    Every model is called as ``model(z, r, t, labels=None) -> u`` with ``r, t`` of shape (B,).
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key](**kwargs)
