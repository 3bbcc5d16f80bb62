"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around a model trained with the one-pass MeanFlow loss.

Two gloo processes on the CPU, each with half of a global batch, every layer and the root sharded
(and the root alone): one MeanFlow step (Adam) gives the weights of the same step on the whole batch
in one process, for the Dual path (the library's models) and the row tangent (any model). FSDP2
finds the tensors whose gradients it reduce-scatters by walking each call's inputs and outputs,
which is why ``Dual`` is a dataclass.

The trainer with ``train.parallel=fsdp`` on two processes: weights and EMAs equal the one-process
run, and a stopped and resumed run equals the uninterrupted one.
"""
from __future__ import annotations

import json
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

from conftest import TINY_TOY, free_port
from user_models import UserMLP

BATCH = 16
MODES = ("dual", "rows")
CASES = (("dual", "layers"), ("rows", "layers"), ("dual", "root"))  # (JVP mode, what is sharded besides the root)
WEIGHTS = ("model.safetensors", "ema.safetensors", "ema_0.9.safetensors", "ema_std0.2.safetensors")  # ramped and power-function EMAs


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
    """Per case: shard every Linear and the root (or the root only), one step on this rank's half, rank 0 saves the weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode, sharded in CASES:
            model = _model(mode)
            for layer in [m for m in model.modules() if isinstance(m, nn.Linear)] if sharded == "layers" else []:
                fully_shard(layer)
            fully_shard(model)
            local = BATCH // world
            _step(model, _data()[rank * local:(rank + 1) * local], mode, Shard(rank * local, BATCH))
            weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(weights, Path(out) / f"fsdp_{mode}_{sharded}.pt")
        dist.barrier()  # leave together: a rank tearing gloo down while the other still runs can abort at exit
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return out


@pytest.mark.heavy
@pytest.mark.parametrize("mode, layers", CASES)
def test_one_fsdp2_step_on_two_processes_equals_one_process(sharded_runs, mode, layers):
    sharded = torch.load(sharded_runs / f"fsdp_{mode}_{layers}.pt")
    reference, start = _model(mode), _model(mode).state_dict()
    _step(reference, _data(), mode, None)
    assert sharded.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert not torch.equal(value, start[key]), key  # the step moved every weight
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6)


# ---- the trainer with train.parallel=fsdp ----------------------------------------------------------


def _overrides(tiny_toy_overrides: list[str], steps: int) -> list[str]:
    return [*tiny_toy_overrides, f"train.steps={steps}", "train.checkpoint_every=3", "train.batch_size=32", "train.log_every=3",
            "train.sample_every=3", "eval.baseline_ode_steps=2", "train.grad_clip=0.05", "train.ema_decays=[0.5, 0.9]",
            "train.ema_rampup=0.5", "train.ema_stds=[0.2]", "model.kwargs.dropout=0.0", "train.parallel=fsdp",
            "train.lr_decay=none"]  # a shorter run stands for a stop


def _trainer_worker(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    """In one process group: an uninterrupted 6-step run, a 3-step run, then that run resumed to 6 steps.
    Records how many modules were sharded."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule

    from meanflow.config import load_config
    from meanflow.training import trainer

    original_shard = trainer.D.shard_model

    def shard_spy(model):
        original_shard(model)
        (Path(out) / f"sharded_rank{rank}.txt").write_text(str(sum(isinstance(m, FSDPModule) for m in model.modules())))

    trainer.D.shard_model = shard_spy
    trainer.D.teardown = lambda: None  # one process group for the three runs
    try:
        trainer.train(load_config("toy", [*overrides, "train.steps=6"]), Path(out) / "full")
        trainer.train(load_config("toy", [*overrides, "train.steps=3"]), Path(out) / "stopped")
        trainer.train(load_config("toy", [*overrides, "train.steps=6"]), Path(out) / "stopped", resume=True)
        trainer.train(load_config("toy", [*overrides, "train.steps=6", "train.precision=bf16"]), Path(out) / "bf16")
        dist.barrier()  # leave together (see _worker)
    finally:
        dist.destroy_process_group()


def _checkpoint(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from meanflow.runtime import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(run)
    files = {name: load_file(str(path / name)) for name in WEIGHTS}
    return {**files, "optimizer": ckpt.read_state(path)["optimizer"]["state"]}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_trainer")
    mp.start_processes(_trainer_worker, args=(2, free_port(), str(out), _overrides(list(TINY_TOY), 6)),
                       nprocs=2, start_method="spawn")
    return out


@pytest.mark.heavy
def test_fsdp_training_on_two_processes_equals_one_process(fsdp_runs, tmp_path, tiny_toy_overrides):
    from meanflow.config import load_config
    from meanflow.training.trainer import train

    assert (fsdp_runs / "sharded_rank0.txt").read_text() == "3"  # the mlp's 2 residual blocks and the root
    one = train(load_config("toy", _overrides(tiny_toy_overrides, 6)), tmp_path / "one")  # one process: nothing to shard
    mine, theirs = _checkpoint(one), _checkpoint(fsdp_runs / "full")
    for name in WEIGHTS:
        assert mine[name].keys() == theirs[name].keys()
        diffs = torch.cat([(mine[name][k] - theirs[name][k]).abs().flatten() for k in mine[name]])
        assert float(diffs.max()) < 1e-3 and float((diffs > 1e-6).float().mean()) < 0.01, (name, float(diffs.max()))
    assert mine["optimizer"].keys() == theirs["optimizer"].keys()  # full, int-keyed optimizer state, as without FSDP
    for i, state in mine["optimizer"].items():
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in theirs["optimizer"][i].items()}
    assert (fsdp_runs / "full" / "samples" / "step_00000006.png").exists()  # previews from the gathered EMA weights
    logged = [json.loads(line) for line in (fsdp_runs / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] > 0.05 for r in logged if "grad_norm" in r] == [True, True]  # clipped: the sharded norm matters


@pytest.mark.heavy
def test_stopped_and_resumed_fsdp_training_equals_the_uninterrupted_run(fsdp_runs):
    full, resumed = _checkpoint(fsdp_runs / "full"), _checkpoint(fsdp_runs / "stopped")
    for name in WEIGHTS:
        for key, value in full[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    for i, state in full["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"][i][key]), (i, key)


@pytest.mark.heavy
def test_fsdp_training_under_bf16_autocast_tracks_one_process(fsdp_runs, tmp_path, tiny_toy_overrides):
    """FSDP2 with bf16 autocast trains fp32 weights that stay within bf16 rounding of the one-process bf16 run:
    their median gap is below the one between that run and its fp32 twin (the rounding's own scale)."""
    from meanflow.config import load_config
    from meanflow.training.trainer import train

    one = train(load_config("toy", [*_overrides(tiny_toy_overrides, 6), "train.precision=bf16"]), tmp_path / "one")
    mine, theirs, fp32 = _checkpoint(one), _checkpoint(fsdp_runs / "bf16"), _checkpoint(fsdp_runs / "full")
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(v.dtype == torch.float32 for v in theirs[name].values())  # fp32 weights, bf16 only inside autocast
        gap = torch.cat([(mine[name][k] - theirs[name][k]).abs().flatten() for k in mine[name]])
        rounding = torch.cat([(mine[name][k] - fp32[name][k]).abs().flatten() for k in mine[name]])
        assert float(rounding.median()) > 0 and float(gap.median()) < float(rounding.median()), name
        assert float(gap.max()) < 1e-2, (name, float(gap.max()))


def test_fsdp_refuses_a_loss_with_two_passes(tmp_path, tiny_toy_overrides):
    from meanflow.config import ConfigError, load_config
    from meanflow.training.trainer import train

    cfg = load_config("toy", [*_overrides(tiny_toy_overrides, 1), "objective.jvp=forward_ad"])
    with pytest.raises(ConfigError, match="train.parallel=fsdp needs .* or use train.parallel=ddp"):
        train(cfg, tmp_path / "refused")
