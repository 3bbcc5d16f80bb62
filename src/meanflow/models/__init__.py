"""Models floor (beside data, objectives, metrics): network families ``model(z, r, t, labels=None) -> u``
with r, t of shape (B,), their preset registry, and building / loading a model from a run."""
from . import mlp  # noqa: F401  (registers presets)
from . import dit, imf_dit, mit, unet  # noqa: F401
from .loading import build_model, load_model, model_spec
from .pretrained import from_pretrained, load_pretrained
from . import pmf_weights  # noqa: F401, E402  (registers the released pMF checkpoint format)
from .registry import available, create, register

__all__ = ["available", "build_model", "create", "from_pretrained", "load_model", "load_pretrained", "model_spec", "register"]
