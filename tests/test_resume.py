"""A run stopped at any step and resumed is the uninterrupted run: weights, every EMA, the optimizer
state, the counters of the non-finite guard, the RNG state and the logged values, bit for bit, with
every feature that consumes randomness or state on (skipped steps, dropout, labels and label drops,
bf16, the batch velocity, stages, several EMAs, warm-up and a decaying learning rate; on images also
flips and EDM augmentation). Resumed on another number of processes (1 -> 2 and 2 -> 1 gloo
processes), it is the uninterrupted run to rounding.

The stop is a crash right after a checkpoint (a hook raising at ``at_checkpoint``), so the stopped
run has the same configuration, and thus the same learning-rate schedule, as the uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_trainer_invariants import _labelled_points

from meanflow.config import load_config
from meanflow.runtime import checkpoint as ckpt
from meanflow.training import trainer
from meanflow.training.hooks import Hooks
from meanflow.training.trainer import train

STEPS = 8
POISONED = {2, 3, 6}  # 0-based steps whose gradient is made inf: state.step 3, 4 and 7 are skipped
FEATURES = (
    "train.warmup_steps=3", "train.lr_decay=cosine", "model.kwargs.dropout=0.1", "objective.label_drop=0.3",
    "train.precision=bf16", "objective.velocity=batch", "train.ema_decays=[0.9, 0.5]", "train.max_bad_steps=3",
    "stages=[{steps: 2, objective: {kind: flow_matching}}, {objective: {ratio: 0.5}}]",
)


class Crash(BaseException):
    """Stands for the process dying; no ``except Exception`` sees it."""


class CrashAfterCheckpoint(Hooks):
    def __init__(self, step: int):
        self.step = step

    def at_checkpoint(self, step, path):
        if step == self.step:
            raise Crash(f"stopped after checkpoint {step}")


def _points_overrides(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "points.npz"
    if not data.exists():
        _labelled_points(data)
    return ["data.name=points", f"data.path={data}", "data.holdout=128", "model.kwargs={width: 32, depth: 2}",
            "train.batch_size=32", "train.log_every=1", "train.device=cpu", f"train.steps={STEPS}",
            "train.checkpoint_every=1", "train.keep_checkpoints=20", *extra]


def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """An inf gradient (finite loss) on the given 0-based steps, decided by the step, so also after a resume."""
    current = {}
    rate = trainer.learning_rate

    def learning_rate(step, cfg):
        current["step"] = step
        return rate(step, cfg)

    def build(spec, _build=trainer.build_model):
        model = _build(spec)
        next(model.parameters()).register_hook(lambda g: g * math.inf if current["step"] in steps else g)
        return model

    monkeypatch.setattr(trainer, "learning_rate", learning_rate)
    monkeypatch.setattr(trainer, "build_model", build)


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / ckpt.checkpoint_name(step)


def _weights_and_emas(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """model.safetensors and every EMA file (whatever EMA options exist), by file name."""
    return {f.name: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}


def _logged(run: Path) -> dict[int, dict]:
    """The logged rows by step, without the speeds (samples_per_s, steps_per_s: wall-clock measurements)."""
    rows = map(json.loads, (run / "log.jsonl").read_text().splitlines())
    return {row["step"]: {k: v for k, v in row.items() if not k.endswith("_per_s")} for row in rows}


def _assert_same_state(a: dict, b: dict) -> None:
    """Two trainer states (or parts of them) equal bit for bit: tensors by torch.equal, the rest by ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key, value in a.items():
            _assert_same_state(value, b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def _assert_resumed_equals_uninterrupted(full: Path, resumed: Path, stop: int, steps: int = STEPS) -> None:
    for step in range(stop + 1, steps + 1):  # every checkpoint written after the resume
        a, b = _checkpoint(full, step), _checkpoint(resumed, step)
        weights_a, weights_b = _weights_and_emas(a), _weights_and_emas(b)
        assert weights_a.keys() == weights_b.keys() and len(weights_a) >= 2
        _assert_same_state(weights_a, weights_b)
        _assert_same_state(ckpt.read_state(a), ckpt.read_state(b))  # step, guard counters, optimizer, RNG states
    logged_full, logged_resumed = _logged(full), _logged(resumed)
    assert sorted(logged_resumed) == list(range(1, steps + 1)), "each step logged once"
    for step in range(1, steps + 1):
        assert logged_resumed[step] == logged_full[step], step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as patch:
        _poison_steps(patch, POISONED)
        run = train(load_config("toy", _points_overrides(tmp, *FEATURES)), tmp / "full")
    return tmp, run


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 5, 7])
def test_a_run_stopped_at_any_step_resumes_to_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch, stop):
    """Stops right after a skipped step (3, 4: the guard's run of consecutive skips continues across the
    resume), at the stage boundary (2), inside the warm-up (1) and during the decay."""
    tmp, full = uninterrupted
    _poison_steps(monkeypatch, POISONED)
    cfg = load_config("toy", _points_overrides(tmp, *FEATURES))
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg, run, hooks=[CrashAfterCheckpoint(stop)])
    train(cfg, run, resume=True)
    _assert_resumed_equals_uninterrupted(full, run, stop)
    state = ckpt.read_state(_checkpoint(full, 4))
    assert (state["bad_steps"], state["consecutive_bad"]) == (2, 2)  # the counters this compares do move
    assert ckpt.read_state(_checkpoint(full, STEPS))["bad_steps"] == len(POISONED)


@pytest.mark.heavy
def test_an_image_run_with_flips_and_augmentation_resumes_to_the_uninterrupted_run(tmp_path):
    """The flip and EDM-augmentation streams, dropout and labels of an image run continue across a resume."""
    overrides = ["train.steps=5", "train.batch_size=8", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                 "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2", "train.device=cpu",
                 "data.flip=true", "data.augment=0.5", "model.kwargs={model_channels: 8, attn_resolutions: [], dropout: 0.2}"]
    cfg = load_config("digits", overrides)
    full = train(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", hooks=[CrashAfterCheckpoint(2)])
    train(cfg, tmp_path / "run", resume=True)
    _assert_resumed_equals_uninterrupted(full, tmp_path / "run", 2, steps=5)


# ---- another number of processes ---------------------------------------------------------------------

# The tolerance of a resume on another world size: the two runs differ only in the order of float sums
# (the loss and the gradient of 32 rows summed in one process, or as two sums of 16 added by the
# all-reduce), a few units in the last place per step; Adam divides by sqrt(v), which enlarges that on
# weights whose gradient is near zero. Measured: at most 3e-8 on weights and EMAs of order 1 (both
# directions, 2026-12-03). Bound: 1e-6 absolute, 30 times that, for other CPUs' rounding; the weights move
# by more than 100 times the bound after the resume. Step counts and the guard's counters: exactly.
WORLD_ATOL = 1e-6
WORLD = ("model.kwargs.dropout=0.1", "objective.label_drop=0.3", "train.warmup_steps=3", "train.lr_decay=cosine",
         "train.ema_decays=[0.9, 0.5]", "objective.jvp=forward_ad")  # forward_ad: the explicit all-reduce path


def _world_worker(rank: int, world: int, port: int, out: str, overrides: list[str], stop: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config("toy", overrides)
    if stop:
        try:
            train(cfg, out, hooks=[CrashAfterCheckpoint(stop)])
        except Crash:
            return  # every rank stops after the checkpoint, as a killed job would
    else:
        train(cfg, out, resume=True)


def _leg(world: int, out: Path, overrides: list[str], stop: int = 0) -> None:
    """Train on ``world`` processes: until the crash after checkpoint ``stop``, or (stop 0) resume to the end."""
    if world == 1:
        cfg = load_config("toy", overrides)
        if stop:
            with pytest.raises(Crash):
                train(cfg, out, hooks=[CrashAfterCheckpoint(stop)])
        else:
            train(cfg, out, resume=True)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_world_worker, args=(world, free_port(), str(out), overrides, stop), nprocs=world, start_method="spawn")


@pytest.mark.heavy
@pytest.mark.parametrize("first, second", [(1, 2), (2, 1)])
def test_a_run_resumed_on_another_number_of_processes_is_the_uninterrupted_run_to_rounding(tmp_path, first, second):
    overrides = _points_overrides(tmp_path, *WORLD)
    full = train(load_config("toy", overrides), tmp_path / "full")
    run = tmp_path / "run"
    _leg(first, run, overrides, stop=3)
    assert ckpt.latest_checkpoint(run / "checkpoints").name == ckpt.checkpoint_name(3)
    _leg(second, run, overrides)
    a, b = _weights_and_emas(_checkpoint(full, STEPS)), _weights_and_emas(_checkpoint(run, STEPS))
    assert a.keys() == b.keys() and len(a) == 3
    start = _weights_and_emas(_checkpoint(full, 3))["model.safetensors"]
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(b[name][key], a[name][key], rtol=0, atol=WORLD_ATOL, msg=f"{name} {key}")
    moved = max(float((a["model.safetensors"][k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * WORLD_ATOL, "the steps after the resume moved the weights far more than the tolerance"
    logged_full, logged_run = _logged(full), _logged(run)
    assert sorted(logged_run) == list(range(1, STEPS + 1))
    for step, row in logged_full.items():  # a sum of the gradients over processes would double the gradient norm
        for key in ("loss", "grad_norm", "lr"):
            assert logged_run[step][key] == pytest.approx(row[key], rel=1e-4), (step, key)
    sa, sb = ckpt.read_state(_checkpoint(full, STEPS)), ckpt.read_state(_checkpoint(run, STEPS))
    assert (sa["step"], sa["bad_steps"], sa["consecutive_bad"]) == (sb["step"], sb["bad_steps"], sb["consecutive_bad"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert float(pa["step"]) == float(pb["step"]) == STEPS
        torch.testing.assert_close(pb["exp_avg"], pa["exp_avg"], rtol=1e-4, atol=1e-7)
