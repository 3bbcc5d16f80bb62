"""Objectives floor (beside models, data, metrics): plug-ins registered by name (``flow_matching``,
``meanflow``, ``imf``, ``pmf``, ``alphaflow``), the per-batch draws, path and time samplers; losses know nothing of training."""
from .alphaflow import AlphaFlowLoss
from .base import Objective, Targets, available, create, get, register
from .draws import BatchRandom, Draws, Shard, draw_batch
from .flow_matching import FlowMatchingLoss
from .imf import IMFLoss
from .meanflow import MeanFlowLoss
from .path import conditional_velocity, interpolate
from .pmf import PMFLoss
from .time_samplers import TIME_SAMPLERS, TimeSampler, jvp_count, jvp_mask

__all__ = [
    "AlphaFlowLoss", "BatchRandom", "Draws", "FlowMatchingLoss", "IMFLoss", "MeanFlowLoss", "Objective", "PMFLoss",
    "Shard", "TIME_SAMPLERS",
    "Targets", "TimeSampler", "available", "conditional_velocity", "create", "draw_batch", "get", "interpolate",
    "jvp_count", "jvp_mask", "register",
]
