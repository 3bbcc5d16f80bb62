"""One model trained by several processes: how it is wrapped (DDP, FSDP2 or neither), how its gradients
are averaged, and its state as the full tensors a checkpoint holds.

:func:`parallelise` decides once per run (the rules: :mod:`meanflow.runtime.distributed`): FSDP2
shards the model (``train.parallel=fsdp``), DDP wraps it when the loss calls its forward once with
gradients, and otherwise (forward-mode AD, compile) the gradients are averaged explicitly after the
backward pass (:meth:`Parallel.average_gradients`). Checkpoints hold full tensors whatever the
layout: :func:`full_state` and :func:`full_optimizer_state` gather the shards (collectives: every
rank calls them), :func:`load_full_state` and :func:`sharded_optimizer_state` lay full tensors out
like the live model's (the EMA's shadows: :func:`meanflow.runtime.distributed.shard_like`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import ConfigError
from . import distributed as D


@dataclass(frozen=True)
class Parallel:
    """model: what the optimizer updates (sharded in place under FSDP2); forward: what the loss calls
    (the DDP wrapper, the compiled model or the model itself); explicit: gradients are averaged by
    :func:`~meanflow.runtime.distributed.all_reduce_gradients` after the backward pass."""

    model: nn.Module
    forward: nn.Module | Callable[..., Any]
    info: D.DistInfo
    explicit: bool

    def average_gradients(self) -> None:
        """Average the gradients over ranks where neither DDP nor FSDP2 has done it during the backward pass."""
        if self.explicit:
            D.all_reduce_gradients(self.model, self.info.world_size)


def check_fsdp(parallel: str, one_forward: bool, compiled: bool) -> bool:
    """Whether FSDP2 is asked for (``train.parallel=fsdp``); ConfigError when the run cannot use it (whatever
    the number of processes). ``one_forward``: every loss of the run calls the model's forward once with gradients."""
    if parallel != "fsdp":
        return False
    if compiled or not one_forward:
        raise ConfigError(
            f"train.parallel=fsdp needs a loss that runs the model's forward once with gradients, without compile "
            f"(one forward pass: {one_forward}, train.compile={compiled}); set objective.jvp=auto (a one-pass tangent) "
            f"and train.compile=false, or use train.parallel=ddp"
        )
    return True


def parallelise(model: nn.Module, info: D.DistInfo, parallel: str, one_forward: bool, compiled: bool) -> Parallel:
    """Shard ``model`` (on its device) with FSDP2, wrap it in DDP, or compile it, as the run asks (module docstring).

    Call it before building the optimizer: FSDP2 replaces the parameters by their shards.
    """
    if check_fsdp(parallel, one_forward, compiled) and info.enabled:
        D.shard_model(model)
        return Parallel(model, model, info, explicit=False)
    ddp = D.data_parallel(model, info, one_forward, compiled=compiled)
    forward = ddp or (torch.compile(model) if compiled else model)
    return Parallel(model, forward, info, explicit=ddp is None)


def grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """The global gradient norm (0-d, on the device; of the whole gradients when they are sharded), after
    clipping the gradients to ``clip`` when > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return D.local(next(model.parameters())).new_zeros(())
    norm = D.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered into its full tensor (a collective: call it on all ranks)."""
    return {k: D.full_tensor(v) for k, v in state.items()}


def load_full_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights)`` of full tensors, into this rank's shards when ``model`` is sharded."""
    if D.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # ~1 s import, FSDP only

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full tensors (the layout of an unsharded optimizer; call it on all ranks)."""
    state = optimizer.state_dict()
    return {**state, "state": {i: full_state(values) for i, values in state["state"].items()}}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A saved (full) optimizer state dict with each per-parameter tensor laid out like its parameter."""
    params = dict(enumerate(p for group in optimizer.param_groups for p in group["params"]))
    return {**state, "state": {i: {k: _layout(v, params.get(i)) if k != "step" else v for k, v in values.items()}
                               for i, values in state["state"].items()}}


def _layout(value: Any, param: torch.Tensor | None) -> Any:
    """``value`` sharded like ``param`` when it is a tensor of the parameter's shape (moments), else as it is."""
    if param is None or not torch.is_tensor(value) or value.shape != param.shape:
        return value
    return D.shard_like(value, param)


__all__ = ["Parallel", "check_fsdp", "full_optimizer_state", "full_state", "grad_norm", "load_full_state", "parallelise",
           "sharded_optimizer_state"]
