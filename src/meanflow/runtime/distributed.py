"""Process-group helpers for torchrun (NCCL on GPUs, gloo on CPU).

Gradients are averaged over ranks in one of two ways (:func:`data_parallel` picks):

* ``DistributedDataParallel`` when the loss runs the model's forward once with gradients (the
  objective says so: ``Objective.one_forward``; e.g. a JVP whose tangent rides outside autograd).
  DDP's bucketed all-reduce overlaps the backward pass.
* Otherwise (forward-mode AD: ``torch.func.jvp`` cannot run through DDP, and calling the inner
  module would skip DDP's all-reduce silently; and under ``train.compile``) the model is not
  wrapped and :func:`all_reduce_gradients` averages the gradients explicitly after the backward
  pass.

:func:`check_in_sync` verifies that the parameters agree on every rank (at the first step and
on demand) either way.

With ``train.parallel=fsdp`` (one-forward losses only) :func:`shard_model` applies FSDP2
(``fully_shard``) instead: parameters, gradients and optimizer state are DTensors sharded over the
ranks, and :func:`full_tensor` / :func:`shard_like` convert between them and the full tensors that
checkpoints hold.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: Any = None  # process group for host-side flags (gloo); None: the default group is gloo already

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def process_rank() -> int:
    """This process's global rank as torchrun announces it (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    host_group = None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and dist.get_backend() != "gloo":
        host_group = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, host_group=host_group)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module, info: DistInfo, one_forward: bool, compiled: bool = False) -> nn.Module | None:
    """``DistributedDataParallel(model)`` when several processes train with a one-forward loss, else None.

    ``one_forward``: whether every loss of the run calls the model's forward once with gradients.
    When None is returned the caller averages gradients with :func:`all_reduce_gradients`.
    Buffers are synchronised once at construction, not before every forward: they are deterministic
    functions of the configuration here.
    """
    if not info.enabled or compiled or not one_forward:
        return None
    devices = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=devices, forward_sync_buffers=False)


def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: ``fully_shard`` every child block of each ``nn.ModuleList`` (innermost first), then
    the root, which holds the remaining parameters (a model without ModuleLists is sharded as one unit).

    Each block's parameters are all-gathered just before its forward and backward and freed after,
    and its gradients are reduce-scattered (averaged over ranks) during the backward pass.
    """
    from torch.distributed.fsdp import fully_shard  # imported here: torch.distributed.tensor takes ~1 s to import

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for module_list in reversed(lists):
        for block in module_list:
            fully_shard(block)
    fully_shard(model)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor, without importing ``torch.distributed.tensor`` (~1 s) when nothing
    has imported it yet (then no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2, :func:`shard_model`)."""
    return any(is_dtensor(p) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: call it on all ranks), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (every rank holds the same values) laid out like ``like``: this rank's shard as a DTensor
    with ``like``'s mesh and placements when ``like`` is one (no communication), else ``full`` itself."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a DTensor (aliasing it), else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def all_reduce_gradients(model: nn.Module, world_size: int) -> None:
    """Average every parameter's gradient over all ranks (one flat buffer, one collective).

    Parameters without a gradient contribute zeros, so every rank issues the same collective.
    """
    if world_size <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """(2,) float64: sum and sum of squares of all parameters weighted by position (order-sensitive)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return torch.stack([(flat * weights).sum(), (flat * flat).sum()])


def check_in_sync(model: nn.Module, info: DistInfo, step: int) -> None:
    """Raise RuntimeError when the parameters differ between ranks (bitwise checksum comparison).

    Skipped for a sharded model (:func:`shard_model`): each parameter element is stored on one rank
    only, so there are no replicas that could drift apart.
    """
    if not info.enabled or is_sharded(model):
        return
    local = parameter_checksum(model)
    gathered = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    bad = [r for r, c in enumerate(gathered) if not torch.equal(c, gathered[0])]
    if bad:
        raise RuntimeError(
            f"parameters differ between ranks at step {step} (ranks {bad} disagree with rank 0): gradient "
            "synchronisation is broken; stopping before the run diverges silently"
        )


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of ``values`` over ranks, on the device (NaN propagates; no host read)."""
    if not info.enabled:
        return values
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def any_over_ranks(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is set on any rank: a host-side collective (gloo, CPU), no device synchronisation."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.host_group)
    return bool(t.item())


def sum_over_ranks(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks (in place; the tensor itself without torchrun)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows (B, ...) concatenated in rank order, (world * B, ...); ``tensor`` itself without
    a process group. Collective: every process must call it with the same B."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without torchrun)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
