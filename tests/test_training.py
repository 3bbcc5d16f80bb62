"""Trainer behaviour: exact resume after SIGKILL, non-finite guard, distributed equivalence."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meanflow.config import load_config
from meanflow.data import load_dataset
from meanflow.data.base import TensorDataset
from meanflow.runtime import checkpoint as ckpt
from meanflow.training.trainer import TrainingDiverged, train

from conftest import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meanflow", *args]


def _assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float reduction order. Adam divides by sqrt(v), so a near-zero gradient whose last
    bits differ can move one weight by up to ~lr; allow that on a handful of elements only."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diffs.max()) < 1e-3 and float((diffs > 1e-6).float().mean()) < 0.01, (float(diffs.max()), float((diffs > 1e-6).float().mean()))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve_checkpoint(run) / "model.safetensors"))


@pytest.mark.heavy
def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_toy_overrides):
    args = ["train", "--config", "toy", "--no-eval", *tiny_toy_overrides, "train.steps=240", "train.checkpoint_every=40"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "full")), check=True, env=ENV, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(run)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "checkpoints" / ckpt.checkpoint_name(40) / ckpt.MARKER
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = ckpt.latest_checkpoint(run / "checkpoints")
    assert last is not None and int(last.name.split("_")[1]) < 240, "the run must be killed mid-way"

    subprocess.run(_cli("train", "--resume", str(run), "--no-eval"), check=True, env=ENV, capture_output=True)
    full, resumed = _final_weights(tmp_path / "full"), _final_weights(run)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert (ckpt.resolve_checkpoint(run) / "ema.safetensors").read_bytes() == (ckpt.resolve_checkpoint(tmp_path / "full") / "ema.safetensors").read_bytes()


class PoisonedData:
    """Wraps a data set and returns NaN batches on chosen calls (one call per training step)."""

    def __init__(self, data: TensorDataset, poison_calls):
        self.data, self.poison_calls, self.calls = data, poison_calls, 0
        self.kind, self.num_classes, self.sample_shape, self.info = data.kind, data.num_classes, data.sample_shape, data.info

    def __len__(self):
        return len(self.data)

    def get(self, index):
        x, y = self.data.get(index)
        if self.poison_calls(self.calls):
            x = x.clone()
            x[0, 0] = float("nan")
        self.calls += 1
        return x, y


def _toy_cfg(overrides, *extra):
    return load_config("toy", [*overrides, *extra])


def test_nan_batch_is_skipped_and_weights_stay_finite(tmp_path, tiny_toy_overrides):
    cfg = _toy_cfg(tiny_toy_overrides, "train.steps=12", "train.checkpoint_every=12")
    train_set, ref = load_dataset(cfg.data, cfg.seed)
    train(cfg, tmp_path, dataset=(PoisonedData(train_set, lambda c: c in (3, 7)), ref))
    last = ckpt.resolve_checkpoint(tmp_path)
    state = ckpt.read_state(last)
    assert state["bad_steps"] == 2 and state["step"] == 12
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(last / name)).values())


def test_repeated_nans_stop_training_with_message(tmp_path, tiny_toy_overrides):
    cfg = _toy_cfg(tiny_toy_overrides, "train.steps=50", "train.checkpoint_every=5", "train.max_bad_steps=4")
    train_set, ref = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(TrainingDiverged, match=r"4 consecutive steps.*non-finite.*Last good checkpoint: .*step_00000005"):
        train(cfg, tmp_path, dataset=(PoisonedData(train_set, lambda c: c >= 6), ref))
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000005"


@pytest.mark.heavy
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, tiny_toy_overrides):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", "--config", "toy", "--no-eval", "--out", str(run), *tiny_toy_overrides,
                                 "train.steps=100000", "train.checkpoint_every=100000"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or log.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted: saved" in err
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None


# ---- distributed ---------------------------------------------------------------------------------


def _dist_worker(rank: int, world: int, port: int, out: str, overrides: list[str], broken: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from meanflow.runtime import distributed as D
    from meanflow.training import trainer

    original_check = D.check_in_sync

    def spy(model, info, step):
        torch.save(D.parameter_checksum(model), Path(out) / f"checksum_rank{info.rank}_step{step}.pt")
        original_check(model, info, step)

    original_wrap = D.data_parallel

    def wrap_spy(model, info, jvp_mode, compiled=False):
        wrapped = None if broken else original_wrap(model, info, jvp_mode, compiled)
        (Path(out) / f"ddp_rank{info.rank}.txt").write_text(type(wrapped).__name__)
        return wrapped

    trainer.D.check_in_sync = spy
    trainer.D.data_parallel = wrap_spy
    if broken:  # neither DDP nor the explicit all-reduce: ranks drift apart
        trainer.D.all_reduce_gradients = lambda model, world_size: None
    cfg = load_config("toy", overrides)
    train(cfg, out)


def _spawn(world: int, out: Path, overrides: list[str], broken: bool = False) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_dist_worker, args=(world, free_port(), str(out), overrides, broken), nprocs=world, start_method="spawn")


@pytest.fixture
def dist_overrides(tiny_toy_overrides):
    return [*tiny_toy_overrides, "train.steps=6", "train.checkpoint_every=6", "train.batch_size=32", "model.kwargs.dropout=0.0"]


@pytest.mark.heavy
def test_two_gloo_processes_match_one_process(tmp_path, dist_overrides):
    _spawn(2, tmp_path / "two", dist_overrides)
    sums = [torch.load(tmp_path / "two" / f"checksum_rank{r}_step6.pt") for r in (0, 1)]
    assert torch.equal(sums[0], sums[1]), "parameters differ between ranks"
    assert (tmp_path / "two" / "ddp_rank0.txt").read_text() == "DistributedDataParallel"  # one-pass JVP: DDP all-reduces
    _spawn(1, tmp_path / "one", dist_overrides)
    _assert_same_training(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"))


@pytest.mark.heavy
def test_broken_gradient_sync_is_caught(tmp_path, dist_overrides):
    with pytest.raises(Exception, match="differ between ranks"):
        _spawn(2, tmp_path / "broken", dist_overrides, broken=True)


@pytest.mark.heavy
def test_torchrun_cli_matches_single_process(tmp_path, tiny_toy_overrides):
    args = ["train", "--config", "toy", "--no-eval", *tiny_toy_overrides, "train.steps=5", "train.checkpoint_every=5", "train.batch_size=32"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "meanflow"]
    subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], check=True, env=ENV, capture_output=True)
    _assert_same_training(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"))
