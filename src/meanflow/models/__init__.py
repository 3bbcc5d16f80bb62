"""Model families. Every model is ``model(z, r, t, labels=None) -> u`` with r, t of shape (B,)."""
from . import mlp  # noqa: F401  (registers presets)
from . import dit, unet  # noqa: F401
from .registry import available, create, register

__all__ = ["available", "create", "register"]
