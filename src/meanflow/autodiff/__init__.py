"""Autodiff infrastructure (bottom floor): how du/dt, the derivative of a network along a tangent,
is computed for a subset of the batch's rows. Knows nothing of objectives, data or training."""
from .jvp import AUTO_ORDER, MODES, JVPMode, JVPOut, Tangent, jvp, mode_names, register_mode

__all__ = ["AUTO_ORDER", "MODES", "JVPMode", "JVPOut", "Tangent", "jvp", "mode_names", "register_mode"]
