"""Objectives floor (beside models, data, metrics): the MeanFlow loss, Flow Matching as its r = t case,
path and time samplers; losses are callables over (model, batch) and know nothing of training."""
from .meanflow import Draws, FlowMatchingLoss, MeanFlowLoss, Shard, Targets
from .path import conditional_velocity, interpolate
from .time_samplers import TIME_SAMPLERS, TimeSampler, jvp_count, jvp_mask

__all__ = [
    "Draws", "FlowMatchingLoss", "MeanFlowLoss", "Shard", "Targets", "TIME_SAMPLERS", "TimeSampler",
    "conditional_velocity", "interpolate", "jvp_count", "jvp_mask",
]
