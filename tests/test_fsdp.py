"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around a model trained with the one-pass MeanFlow loss.

Two gloo processes on the CPU, each with half of a global batch, every layer and the root sharded:
one MeanFlow step (Adam) gives the weights of the same step on the whole batch in one process, for
the Dual path (the library's models) and the row tangent (any model). FSDP2 finds the tensors whose
gradients it reduce-scatters by walking each call's inputs and outputs, which is why ``Dual`` is a
dataclass.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from meanflow import MeanFlowLoss
from meanflow.models import create
from meanflow.objectives import Shard

from conftest import free_port
from user_models import UserMLP

BATCH = 16
MODES = ("dual", "rows")


def _model(mode: str) -> nn.Module:
    torch.manual_seed(0)
    return create("mlp", dim=3, width=32, depth=2, num_classes=0) if mode == "dual" else UserMLP()


def _step(model: nn.Module, x: torch.Tensor, mode: str, shard: Shard | None) -> None:
    """One MeanFlow step (half the rows with r != t) with Adam, the draws of the global batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    loss, _ = MeanFlowLoss(ratio=0.5, jvp=mode)(model, x, generator=torch.Generator().manual_seed(3), shard=shard)
    loss.backward()
    optimizer.step()


def _data() -> torch.Tensor:
    return torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """Per JVP mode: shard every Linear and the root, one step on this rank's half, rank 0 saves the weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in MODES:
            model = _model(mode)
            for layer in [m for m in model.modules() if isinstance(m, nn.Linear)]:
                fully_shard(layer)
            fully_shard(model)
            local = BATCH // world
            _step(model, _data()[rank * local:(rank + 1) * local], mode, Shard(rank * local, BATCH))
            weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(weights, Path(out) / f"fsdp_{mode}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


@pytest.mark.parametrize("mode", MODES)
def test_one_fsdp2_step_on_two_processes_equals_one_process(sharded_runs, mode):
    sharded = torch.load(sharded_runs / f"fsdp_{mode}.pt")
    reference, start = _model(mode), _model(mode).state_dict()
    _step(reference, _data(), mode, None)
    assert sharded.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert not torch.equal(value, start[key]), key  # the step moved every weight
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6)
