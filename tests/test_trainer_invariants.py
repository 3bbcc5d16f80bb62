"""What the trainer promises after the loss: EMA arithmetic, exact resume, the non-finite guard, bf16.

Each test reads the run's checkpoints (plain safetensors and the trainer state) and checks them
against arithmetic done here by hand.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow import MeanFlowLoss
from meanflow.config import load_config
from meanflow.models import create
from meanflow.runtime import checkpoint as ckpt
from meanflow.training import trainer
from meanflow.training.trainer import train


def _labelled_points(path: Path, n: int = 640) -> Path:
    """Three labelled 2-D Gaussian blobs in a .npz point file."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    centres = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]])
    np.savez(path, x=(centres[labels] + 0.2 * rng.normal(size=(n, 2))).astype(np.float32), labels=labels)
    return path


def _cfg(tmp_path: Path, *extra: str):
    data = _labelled_points(tmp_path / "points.npz")
    return load_config("toy", [
        "data.name=points", f"data.path={data}", "data.holdout=128", "model.kwargs={width: 32, depth: 2}",
        "train.batch_size=32", "train.log_every=1", "train.warmup_steps=0", "train.device=cpu", *extra,
    ])


def _weights(run: Path, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / ckpt.checkpoint_name(step) / name))


def _state(run: Path, step: int) -> dict:
    return ckpt.read_state(run / "checkpoints" / ckpt.checkpoint_name(step))


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- EMA ----------------------------------------------------------------------------------------


def test_each_ema_follows_its_per_step_decay(tmp_path):
    """ema_k = b_k ema_{k-1} + (1 - b_k) theta_k from one checkpoint to the next, with b_k = min(decay, 0.5 ** (1 / (rampup k)))
    for the exponential EMAs (ramping up, then capped: 0.6 from step 3) and (1 - 1/k) ** (gamma + 1) for the power one."""
    run, std = tmp_path / "run", math.sqrt(4 / (5 ** 2 * 6))  # gamma = 3: sqrt((g + 1) / ((g + 2)^2 (g + 3)))
    cfg = _cfg(tmp_path, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.ema_decays=[0.9, 0.6]",
               "train.ema_rampup=0.5", f"train.ema_stds=[{std!r}]")
    train(cfg, run)
    profiles = {"ema.safetensors": lambda k: min(0.9, 0.5 ** (1 / (0.5 * k))), "ema_0.6.safetensors": lambda k: min(0.6, 0.5 ** (1 / (0.5 * k))),
                f"ema_std{std:g}.safetensors": lambda k: (1 - 1 / k) ** 4}
    for name, beta in profiles.items():
        for step in (2, 3, 4):
            before, theta, after = _weights(run, step - 1, name), _weights(run, step), _weights(run, step, name)
            for key in theta:
                expected = beta(step) * before[key].double() + (1 - beta(step)) * theta[key].double()
                torch.testing.assert_close(after[key].double(), expected, rtol=0, atol=1e-6)


def test_previews_sample_from_an_eval_copy_holding_the_first_ema(tmp_path):
    from meanflow.training.hooks import Hooks

    seen = []

    class Recorder(Hooks):
        def at_evaluation(self, step, model, data):
            seen.append((step, model.training, {k: v.clone() for k, v in model.state_dict().items()}))

    run = tmp_path / "run"
    train(_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.sample_every=2", "train.ema_decays=[0.9, 0.6]"),
          run, hooks=[Recorder()])
    assert [step for step, _, _ in seen] == [2, 4]
    meta = json.loads((run / "checkpoints" / ckpt.checkpoint_name(4) / "meta.json").read_text())
    resolved = load_config(run / "config.yaml").objective.resolved()  # the run's guidance options, kept for sampling
    assert meta["guidance"] == {k: resolved[k] for k in ("omega", "kappa", "t_start", "t_end", "label_drop")}
    assert meta["format"] == 1 and meta["objective"] == "meanflow" and meta["step"] == 4
    for step, training, state in seen:
        assert not training and (run / "samples" / f"step_{step:08d}.png").stat().st_size > 0
        _assert_equal(state, _weights(run, step, "ema.safetensors"))


def test_a_signal_saves_a_checkpoint_at_the_end_of_the_next_step_and_stops(tmp_path):
    import os
    import signal

    from meanflow.training.hooks import Hooks

    class Interrupt(Hooks):
        def after_step(self, step, stats, model):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    before, run = signal.getsignal(signal.SIGTERM), tmp_path / "run"
    train(_cfg(tmp_path, "train.steps=10", "train.checkpoint_every=0"), run, hooks=[Interrupt()])
    assert [p.name for p in (run / "checkpoints").iterdir()] == [ckpt.checkpoint_name(3)]  # seen at step 3's end
    assert signal.getsignal(signal.SIGTERM) is before


# ---- resume ---------------------------------------------------------------------------------------

# a shorter train.steps stands for the interruption, so the schedule must not depend on it: no lr decay
RESUME = ("train.warmup_steps=5", "model.kwargs.dropout=0.1", "objective.label_drop=0.2", "train.precision=bf16",
          "train.ema_decays=[0.9]", "train.ema_rampup=0.3", "train.ema_stds=[0.2]", "train.checkpoint_every=3", "train.lr_decay=none")


def test_resume_with_warmup_dropout_labels_bf16_is_bit_identical(tmp_path, capsys):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(_cfg(tmp_path, *RESUME, "train.steps=8"), full)
    train(_cfg(tmp_path, *RESUME, "train.steps=3"), stopped)
    capsys.readouterr()
    train(_cfg(tmp_path, *RESUME, "train.steps=8"), stopped, resume=True)
    assert f"resuming from {stopped / 'checkpoints' / ckpt.checkpoint_name(3)} (step 3)" in capsys.readouterr().out
    for name in ("model.safetensors", "ema.safetensors", "ema_std0.2.safetensors"):  # the ramping and the power-function EMA
        _assert_equal(_weights(full, 8, name), _weights(stopped, 8, name))
    a, b = _state(full, 8), _state(stopped, 8)
    assert a["step"] == b["step"] == 8
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert float(pa["step"]) == float(pb["step"]) == 8.0
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # the resumed process logged steps 4..8 once each, with the warmup continuing where it stopped
    logged = [json.loads(line) for line in (stopped / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 9))
    lr = load_config("toy").train.lr
    for entry in logged:
        assert entry["lr"] == pytest.approx(lr * min(1.0, entry["step"] / 5), rel=1e-12), entry


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_learning_rate_warms_up_then_decays_towards_zero_at_the_last_step(tmp_path, decay):
    run = tmp_path / decay
    train(_cfg(tmp_path, "train.steps=7", "train.warmup_steps=2", f"train.lr_decay={decay}", "train.lr=0.01",
               "train.checkpoint_every=0"), run)
    logged = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    # steps 0-1 warm up to 0.01; steps 2..6 decay over the 5 post-warm-up steps, f = 0, 0.2, ..., 0.8
    fractions = [0.0, 0.2, 0.4, 0.6, 0.8]
    factor = (lambda f: 0.5 * (1 + math.cos(math.pi * f))) if decay == "cosine" else (lambda f: 1 - f)
    assert logged == pytest.approx([0.005, 0.01] + [0.01 * factor(f) for f in fractions], rel=1e-12)


# ---- checkpoint atomicity ---------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying: no ``except Exception`` handler sees it."""


class FileEvents:
    """Audit-hook recorder of file writes and renames under one directory; can crash at the k-th event."""

    armed: FileEvents | None = None

    def __init__(self, root: Path, crash_at: int | None = None):
        self.root, self.crash_at, self.events = str(root), crash_at, []

    def __enter__(self) -> FileEvents:
        FileEvents.armed = self
        return self

    def __exit__(self, *exc) -> None:
        FileEvents.armed = None

    def record(self, kind: str, path: str, target: str | None = None) -> None:
        if not path.startswith(self.root):
            return
        self.events.append((kind, path, target))
        if self.crash_at is not None and len(self.events) == self.crash_at + 1:
            raise Crash(f"crash at {kind} {path}")


def _audit(event: str, args, recorder=FileEvents) -> None:
    rec = recorder.armed  # the default argument outlives the module's globals at interpreter exit
    if rec is None:
        return
    if event == "open" and isinstance(args[0], (str, Path)):
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & (1 | 2))
        if writes:
            rec.record("write", str(args[0]))
    elif event == "os.rename":
        rec.record("rename", str(args[0]), str(args[1]))


_HOOKED = []


def _install_audit_hook() -> None:
    """One process-wide hook (audit hooks cannot be removed); inert unless a FileEvents is active."""
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)


def _checkpoint_files(step: int) -> dict:
    weights = {"w": torch.full((3, 2), float(step))}
    return {"model.safetensors": weights, "ema.safetensors": weights, "trainer_state.pt": {"step": step},
            "meta.json": {"step": step}, "config.yaml": f"step: {step}\n"}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_checkpoint_is_written_to_a_hidden_directory_and_renamed_marker_last(tmp_path):
    _install_audit_hook()
    root = tmp_path / "checkpoints"
    with FileEvents(root) as rec:
        final = ckpt.save_checkpoint(root, 7, _checkpoint_files(7), keep=2)
    writes = [path for kind, path, _ in rec.events if kind == "write"]
    renames = [(src, dst) for kind, src, dst in rec.events if kind == "rename"]
    assert writes and all(Path(p).parent.name.startswith(".") for p in writes), writes  # never inside step_*/
    assert renames == [(str(Path(writes[0]).parent), str(final))], rec.events
    assert rec.events[-1][0] == "rename"
    assert Path(writes[-1]).name == ckpt.MARKER
    assert {Path(p).name for p in writes} >= {*_checkpoint_files(7), ckpt.MARKER}


def test_a_crash_at_any_point_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    _install_audit_hook()
    root = tmp_path / "checkpoints"
    previous = ckpt.save_checkpoint(root, 5, _checkpoint_files(5), keep=2)
    before = _snapshot(previous)
    with FileEvents(root) as rec:  # count the file events of one save, then undo it
        shutil.rmtree(ckpt.save_checkpoint(root, 6, _checkpoint_files(6), keep=2))
        events = len(rec.events)
    assert events >= len(_checkpoint_files(6)) + 2
    for crash_at in range(events):
        with pytest.raises(Crash), FileEvents(root, crash_at):
            ckpt.save_checkpoint(root, 6, _checkpoint_files(6), keep=2)
        reported: list[str] = []
        assert ckpt.latest_checkpoint(root, reported.append) == previous, crash_at
        assert ckpt.complete_checkpoints(root) == [previous]
        assert _snapshot(previous) == before
        assert any("partial" in line or "incomplete" in line for line in reported), reported
        assert ckpt.read_state(previous)["step"] == 5
    # the next save of the same step clears the debris and succeeds
    assert ckpt.save_checkpoint(root, 6, _checkpoint_files(6), keep=2) == root / ckpt.checkpoint_name(6)
    assert ckpt.latest_checkpoint(root) == root / ckpt.checkpoint_name(6)


# ---- non-finite guard ----------------------------------------------------------------------------


_BUILD_MODEL = trainer.build_model


def _poison_gradients(monkeypatch, steps: set[int]) -> None:
    """Make one parameter's gradient inf on the given (0-based) steps; the loss itself stays finite."""
    def build_poisoned(spec):
        model = _BUILD_MODEL(spec)
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * math.inf if len(calls) - 1 in steps else grad

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)


@pytest.mark.parametrize("clip", ["0.0", "1.0"])
def test_non_finite_gradient_skips_the_step_and_leaves_weights_optimizer_and_ema(tmp_path, monkeypatch, clip):
    _poison_gradients(monkeypatch, {2})
    run = tmp_path / "run"
    train(_cfg(tmp_path, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10",
               "train.ema_decays=[0.9]", f"train.grad_clip={clip}"), run)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(logged[2]["loss"]) and logged[2]["grad_norm"] is None  # the loss was fine, the gradient not
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_equal(_weights(run, 3, name), _weights(run, 2, name))
        assert not torch.equal(next(iter(_weights(run, 4, name).values())), next(iter(_weights(run, 3, name).values())))
    for before, after in zip(_state(run, 2)["optimizer"]["state"].values(), _state(run, 3)["optimizer"]["state"].values()):
        assert float(before["step"]) == float(after["step"]) == 2.0
        assert torch.equal(before["exp_avg"], after["exp_avg"])
    assert [(_state(run, s)["bad_steps"], _state(run, s)["consecutive_bad"]) for s in (2, 3, 4)] == [(0, 0), (1, 1), (1, 0)]


def test_the_consecutive_counter_resets_after_a_good_step(tmp_path, monkeypatch):
    """Two bad, one good, two bad with max_bad_steps=3 trains on; three bad in a row stops."""
    _poison_gradients(monkeypatch, {1, 2, 4, 5})
    run = tmp_path / "run"
    train(_cfg(tmp_path, "train.steps=7", "train.checkpoint_every=7", "train.max_bad_steps=3"), run)
    assert _state(run, 7)["bad_steps"] == 4 and _state(run, 7)["consecutive_bad"] == 0
    _poison_gradients(monkeypatch, {1, 2, 3})
    with pytest.raises(trainer.TrainingDiverged, match="3 consecutive"):
        train(_cfg(tmp_path, "train.steps=7", "train.max_bad_steps=3"), tmp_path / "diverges")


# ---- bf16 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jvp", ["dual", "forward_ad", "full"])
def test_bf16_autocast_keeps_the_target_maths_in_fp32(jvp):
    torch.manual_seed(0)
    model = create("mlp", dim=2, width=32, depth=2, num_classes=3)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(64) % 3
    loss = MeanFlowLoss(ratio=0.5, jvp=jvp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss.targets(model, x, labels, generator=torch.Generator().manual_seed(2))
    fp32 = loss.targets(model, x, labels, generator=torch.Generator().manual_seed(2))
    assert out.target.dtype == out.u.dtype == torch.float32
    assert float((out.u - fp32.u).detach().abs().max()) > 1e-4, "the network must really have run in bf16"
    h = (out.draws.t - out.draws.r).double()[:, None]
    expected = out.v.double() - h * out.dudt.double()  # v and du/dt as the loss saw them, combined in float64
    torch.testing.assert_close(out.target.double(), expected, rtol=1e-6, atol=1e-6)


def test_bf16_training_on_cpu_tracks_fp32_training(tmp_path):
    """Same seeds, same data: the bf16 run moves the fp32 master weights the way the fp32 run does."""
    runs = {p: tmp_path / p for p in ("fp32", "bf16")}
    for precision, run in runs.items():
        train(_cfg(tmp_path, "train.steps=20", "train.checkpoint_every=1", "train.keep_checkpoints=20",
                   f"train.precision={precision}", "train.lr=0.003"), run)
    fp32, bf16 = ({k: _weights(run, 20)[k] - _weights(run, 1)[k] for k in _weights(run, 1)} for run in runs.values())
    assert all(v.dtype == torch.float32 for v in _weights(runs["bf16"], 20).values()), "master weights stay fp32"
    loss = [json.loads(line)["loss"] for line in (runs["bf16"] / "log.jsonl").read_text().splitlines()]
    assert len(loss) == 20 and all(math.isfinite(v) for v in loss)
    diff = math.sqrt(sum(float((bf16[k] - fp32[k]).pow(2).sum()) for k in fp32))
    size = math.sqrt(sum(float(fp32[k].pow(2).sum()) for k in fp32))
    assert 0 < diff < 0.3 * size, (diff, size)


def test_ema_state_dicts_by_index_and_a_mismatched_state_is_an_error():
    from meanflow.training.ema import EMA

    net = torch.nn.Linear(2, 2)
    ema = EMA(net, [0.5, 0.9])
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=1)
    torch.testing.assert_close(ema.state_dict()["weight"], ema.state_dict(0)["weight"])
    assert not torch.equal(ema.state_dict(0)["weight"], ema.state_dict(1)["weight"])
    wrong = {f"k{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(ValueError, match=r"differing keys: \['bias', 'k0', 'k1', 'k2', 'k3'\]\)"):
        ema.load_state_dict(0, wrong)


def test_a_diverged_run_stops_at_the_next_logging_step_naming_the_bad_steps(tmp_path, monkeypatch):
    """Steps 2-4 non-finite with max_bad_steps=3: the guard trips at step 4, training stops at the read of step 6."""
    _poison_gradients(monkeypatch, {1, 2, 3})
    run = tmp_path / "run"
    with pytest.raises(trainer.TrainingDiverged, match="stopped at step 6: from step 2 to step 4, 3 consecutive"):
        train(_cfg(tmp_path, "train.steps=10", "train.log_every=3", "train.checkpoint_every=0", "train.max_bad_steps=3"), run)
    assert ckpt.latest_checkpoint(run / "checkpoints") is None
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(entry["step"], entry["bad_steps"]) for entry in logged] == [(3, 2)]


def test_an_unfused_optimizer_state_resumes_into_the_fused_optimizer_that_can_skip():
    """Checkpoints of older versions hold unfused Adam states; loaded, the optimizer still skips on the device."""
    from meanflow.training.builders import build_optimizer, load_optimizer_state
    from meanflow.training.ema import EMA
    from meanflow.training.guard import apply_step

    cfg = load_config("toy").train
    torch.manual_seed(0)
    old_net, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = torch.optim.Adam(old_net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    grads = [torch.randn(2, 3), torch.randn(2)]

    def set_grads(model):
        model.weight.grad, model.bias.grad = (g.clone() for g in grads)

    set_grads(old_net)
    old.step()
    net.load_state_dict(old_net.state_dict())
    fused = build_optimizer(net, cfg)
    load_optimizer_state(fused, copy.deepcopy(old.state_dict()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    set_grads(net)
    apply_step(fused, EMA(net, [0.9]), net, torch.tensor(False), step=2)
    _assert_equal(net.state_dict(), before)
    assert all(float(s["step"]) == 1.0 for s in fused.state.values())
    apply_step(fused, EMA(net, [0.9]), net, torch.tensor(True), step=2)
    set_grads(old_net)
    old.step()
    assert all(float(s["step"]) == 2.0 for s in fused.state.values())
    for a, b in zip(net.parameters(), old_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
