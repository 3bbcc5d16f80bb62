"""meanflow: one-step generative models trained with Mean Flows (Geng et al., 2025).

Public API::

    loss_fn = meanflow.MeanFlowLoss(ratio=0.25)          # or meanflow.FlowMatchingLoss()
    loss, stats = loss_fn(model, x, labels=None)           # model(z, r, t, labels) -> u
    x = meanflow.sample(model, noise, steps=1)             # 1-NFE generation
    model = meanflow.models.create("mlp", dim=2)
"""
from . import models
from .objectives import FlowMatchingLoss, MeanFlowLoss
from .sampling import ode_sample, sample

__version__ = "0.1.0"
__all__ = ["FlowMatchingLoss", "MeanFlowLoss", "models", "ode_sample", "sample", "__version__"]
