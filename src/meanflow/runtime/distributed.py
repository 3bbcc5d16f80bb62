"""Process-group helpers for torchrun (NCCL on GPUs, gloo on CPU).

Gradients are averaged over ranks in one of two ways (:func:`data_parallel` picks):

* ``DistributedDataParallel`` when the loss runs the model's forward once with gradients: Flow
  Matching, and MeanFlow with the one-pass JVP modes ("dual", "rows", and "auto", which takes
  one of them), whose tangent rides outside autograd. DDP's bucketed all-reduce overlaps the
  backward pass.
* Otherwise (forward-mode AD, "forward_ad" / "full": ``torch.func.jvp`` cannot run through DDP,
  and calling the inner module would skip DDP's all-reduce silently; and under
  ``train.compile``) the model is not wrapped and :func:`all_reduce_gradients` averages the
  gradients explicitly after the backward pass.

:func:`check_in_sync` verifies that the parameters agree on every rank (at the first step and
on demand) either way.
"""
from __future__ import annotations

import os
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


ONE_FORWARD_JVP_MODES = ("auto", "dual", "rows")  # JVP modes whose loss runs one forward pass with gradients


def data_parallel(model: nn.Module, info: DistInfo, jvp_mode: str | None, compiled: bool = False) -> nn.Module | None:
    """``DistributedDataParallel(model)`` when several processes train with a one-forward loss, else None.

    ``jvp_mode`` is the objective's ``jvp`` option (None: an objective without a JVP, one forward
    pass). When None is returned the caller averages gradients with :func:`all_reduce_gradients`.
    Buffers are synchronised once at construction, not before every forward: they are deterministic
    functions of the configuration here.
    """
    if not info.enabled or compiled or (jvp_mode is not None and jvp_mode not in ONE_FORWARD_JVP_MODES):
        return None
    devices = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=devices, forward_sync_buffers=False)


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
    """Raise RuntimeError when the parameters differ between ranks (bitwise checksum comparison)."""
    if not info.enabled:
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


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without torchrun)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
