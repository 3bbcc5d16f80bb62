"""Sampling floor: turn a model and noise into samples. ``samplers`` holds the plain solvers;
``driver`` draws seeded noise in batches (per-process shares under torchrun) and decodes latents."""
from .driver import decode_samples, generate, iterate_samples
from .samplers import METHODS, guidance_inputs, nfe, ode_sample, prior_scale, sample, time_grid

__all__ = ["METHODS", "decode_samples", "generate", "guidance_inputs", "iterate_samples", "nfe", "ode_sample", "prior_scale", "sample", "time_grid"]
