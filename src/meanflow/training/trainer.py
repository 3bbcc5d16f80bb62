"""The training loop: read top to bottom.

One step: take this rank's shard of the global batch, draw all randomness from generators seeded
by (seed, step) for the whole global batch (dropout masks inside the model too, per global sample:
:mod:`meanflow.autodiff.per_sample`), compute the loss, backpropagate, average gradients over ranks (DDP, FSDP2 or explicitly), and update
the weights and the EMA unless the loss or gradient norm is non-finite, decided on the device
(:mod:`meanflow.training.guard`). Statistics stay on the device and are read by the host only on
logging steps and checkpoints (one copy each). Checkpoints are atomic and carry everything needed to
continue bit-for-bit.
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..autodiff.per_sample import PerSampleDropout
from ..config import Config, ConfigError, InitConfig, save_config, stage_objectives
from ..data import load_dataset, random_flip
from ..data.augment import LABEL_DIM, EDMAugment
from ..data.base import Dataset
from ..data.loader import step_batches
from ..evaluation.preview import preview_plan, save_preview
from ..evaluation.run import check_eval_config
from ..models.loading import build_model, model_spec
from ..models.pretrained import load_pretrained
from ..models.weights import PretrainedError, fill_model
from ..objectives import Shard
from ..runtime import checkpoint as ckpt
from ..runtime import distributed as D
from ..runtime import parallel as P
from ..sampling import guidance_inputs
from ..runtime.seeding import STREAMS, GlobalBatchOrder, derive_seed, restore_rng_states, rng_states, step_generator
from .builders import build_loss, build_optimizer, ema_profiles, learning_rate, load_optimizer_state
from .diagnostics import Diagnostics, StatsWindow, host_copy
from .ema import EMA
from .guard import NonFiniteGuard, TrainingDiverged, apply_step
from .hooks import Hooks, StepStats
from .logging import RunLogger


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    step: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0


def train(cfg: Config, out: str | Path, resume: bool = False, dataset: tuple[Dataset, Dataset | None] | None = None,
          hooks: Sequence[Hooks] = ()) -> Path:
    """Train ``cfg`` into the run directory ``out`` and return it.

    ``resume=True`` continues from the newest complete checkpoint in ``out``. ``dataset`` replaces
    the configured data with an explicit (train, reference) pair (the library API for your own data).
    ``hooks``: :class:`~meanflow.training.hooks.Hooks` called after every step, at every checkpoint
    and at every evaluation (``train.sample_every``), in order.
    """
    info = D.setup(cfg.train.device)
    try:
        return _train(cfg, Path(out), resume, dataset, info, tuple(hooks))
    finally:
        D.teardown()


def _train(cfg: Config, out: Path, resume: bool, dataset, info: D.DistInfo, hooks: tuple[Hooks, ...]) -> Path:
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the number of processes ({info.world_size})")
    stages = [(start, build_loss(objective)) for start, objective in stage_objectives(cfg)]
    one_forward = all(loss.one_forward for _, loss in stages)
    P.check_fsdp(cfg.train.parallel, one_forward, cfg.train.compile)  # fail before any work
    _prepare_out(out, info, resume)
    train_set, reference = dataset or load_dataset(cfg.data, cfg.seed)
    check_eval_config(cfg, train_set.kind)  # the evaluation after training must not fail on its options
    augment = _augmenter(cfg, train_set)
    spec = model_spec(cfg.model, tuple(train_set.sample_shape), train_set.num_classes, LABEL_DIM if augment else 0)
    torch.manual_seed(derive_seed(cfg.seed, -1))  # same initial weights on every rank and every run
    model = build_model(spec)
    guidance_inputs(model, 1, cfg.eval.omega, cfg.eval.interval)  # refuse evaluation guidance the model cannot take, before training
    if cfg.init.path and not resume:
        _initialise(model, cfg.init, print if info.is_main else None)
    model = model.to(info.device)
    par = P.parallelise(model, info, cfg.train.parallel, one_forward, cfg.train.compile)
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA(model, ema_profiles(cfg.train))
    state = TrainState()
    if resume:
        state = _restore(out, spec, model, optimizer, ema, info)
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    meta = _meta(spec, train_set, cfg)
    order = GlobalBatchOrder(len(train_set), cfg.train.batch_size, cfg.seed)
    batches = step_batches(train_set, order, state.step, cfg.train.steps, info.rank, info.world_size,
                           cfg.train.num_workers, pin_memory=info.device.type == "cuda")
    local = cfg.train.batch_size // info.world_size
    logger = RunLogger(out, state.step, cfg.train.steps, info.is_main, cfg.train.batch_size)
    diagnostics, window = Diagnostics(), StatsWindow()
    guard = NonFiniteGuard(info.device, cfg.train.max_bad_steps, state.bad_steps, state.consecutive_bad)
    stop = _StopFlag()
    autocast = _autocast(cfg, info.device)
    try:
        while state.step < cfg.train.steps:
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg.train)
            x, labels, cond = _batch(*next(batches), step, info, cfg, augment)
            loss_fn = next(loss for start, loss in reversed(stages) if step >= start)
            loss_fn.at_step(step, cfg.train.steps)
            rows = torch.arange(info.rank * local, (info.rank + 1) * local, device=info.device)  # this shard's global sample indices
            with autocast, PerSampleDropout(derive_seed(cfg.seed, step, STREAMS["dropout"]), rows, cfg.train.batch_size):
                loss, stats, targets = loss_fn.loss_and_targets(
                    par.forward, x, labels, generator=step_generator(cfg.seed, step, "loss", info.device),
                    shard=Shard(info.rank * local, cfg.train.batch_size), cond=cond)
            diagnostics.update(targets, loss_fn.weighted)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            par.average_gradients()
            keys, values = _step_values({**stats, "grad_norm": P.grad_norm(model, cfg.train.grad_clip)}, info)
            state.step += 1
            apply_step(optimizer, ema, model, guard.observe(values[keys.index("loss")], values[keys.index("grad_norm")], state.step),
                       state.step)
            if step == 0 or state.step == cfg.train.steps:
                D.check_in_sync(model, info, state.step)
            window.add(keys, values)
            lr = optimizer.param_groups[0]["lr"]
            interrupted = D.any_over_ranks(stop.requested, info)
            log_now = bool(cfg.train.log_every) and state.step % cfg.train.log_every == 0
            save_now = interrupted or state.step == cfg.train.steps or bool(cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0)
            read = log_now or save_now  # the only steps whose results the host reads
            report = _read(state, guard, window, diagnostics if log_now else None, info, out, logger) if read else {}
            logger.step(step, {**report, "lr": lr}, log=log_now)
            if hooks:
                step_stats = StepStats({**dict(zip(keys, values)), "lr": lr, "bad_steps": guard.counters[0]})
                for hook in hooks:
                    hook.after_step(state.step, step_stats, model)
            if cfg.train.sample_every and state.step % cfg.train.sample_every == 0:
                weights = P.full_state(ema.state_dict(0))  # every rank: gathers the shards when sharded
                if info.is_main:
                    net = ema_model(spec, weights, info.device)
                    _write_samples(net, train_set, cfg, out / "samples" / f"step_{state.step:08d}", info.device)
                    for hook in hooks:
                        hook.at_evaluation(state.step, net, train_set)
            if save_now:
                path = _save(out, model, optimizer, ema, state, meta, cfg, info)
                for hook in hooks:
                    hook.at_checkpoint(state.step, path)
                if interrupted:
                    logger.message(f"interrupted: saved {path}; continue with --resume {out}")
                    break
    finally:
        logger.close()
        stop.restore()
    return out


def _prepare_out(out: Path, info: D.DistInfo, resume: bool) -> None:
    """Create the run directory and fail early if it is not writable or would be overwritten."""
    if info.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output directory {out} is not writable: {err.strerror or err}") from err
        if not resume and ckpt.latest_checkpoint(out / "checkpoints") is not None:
            raise ConfigError(f"{out} already holds checkpoints; pass --resume {out} to continue or choose another --out")
    D.barrier(info)


def _initialise(model: nn.Module, init: InitConfig, report=None) -> None:
    """Fill ``model`` from ``init.path`` (EMA or raw weights); the EMAs are then built from it."""
    try:
        loaded = load_pretrained(init.path, weights="ema" if init.ema else "model")
    except (PretrainedError, FileNotFoundError) as err:
        raise ConfigError(f"init.path={init.path}: {err}") from None
    try:
        fill_model(model, loaded.model.state_dict(), f"init.path={init.path} holds {loaded.spec['name']} {loaded.spec['kwargs']}, which",
                   "set model.name / model.kwargs to match it", target=f"the configured model {type(model).__name__}")
    except PretrainedError as err:
        raise ConfigError(str(err)) from None
    if report:
        report(f"initialised from {init.path}: {loaded.describe()}; optimizer and schedule start afresh")


def _augmenter(cfg: Config, data: Dataset) -> EDMAugment | None:
    """The EDM augmentation of ``data.augment`` (images only), or None when it is off."""
    if not cfg.data.augment:
        return None
    if data.kind != "images":
        raise ConfigError(f"data.augment={cfg.data.augment} augments images, but {cfg.data.name!r} gives {data.kind}; set data.augment=0")
    return EDMAugment(p=cfg.data.augment)


def _batch(x: torch.Tensor, labels: torch.Tensor | None, step: int, info: D.DistInfo, cfg: Config, augment: EDMAugment | None = None):
    """This rank's (x, labels, cond) for ``step`` on the device, from its loaded batch x (b, ...):
    reproducible horizontal flips, then EDM augmentation, when enabled.

    ``cond`` is None or ``{"augment_labels": (b, 6)}``; all randomness is drawn for the global batch.
    """
    local = slice(info.rank * x.shape[0], (info.rank + 1) * x.shape[0])
    if cfg.data.flip and x.ndim == 4:
        gen = step_generator(cfg.seed, step, "augment")
        flip = (torch.rand(cfg.train.batch_size, generator=gen) < 0.5)[local]
        x = random_flip(x, flip)
    cond = None
    if augment is not None:
        params = augment.draw(cfg.train.batch_size, step_generator(cfg.seed, step, "edm_augment")).take(local)
        x = augment.apply(x, params)
        cond = {"augment_labels": params.labels().to(info.device, non_blocking=True)}
    x = x.to(info.device, non_blocking=True)
    return x, None if labels is None else labels.to(info.device, non_blocking=True), cond


def _step_values(stats: dict[str, torch.Tensor | float], info: D.DistInfo) -> tuple[tuple[str, ...], torch.Tensor]:
    """(names, values (K,) float64 on the device): one step's statistics averaged over processes, no host read."""
    values = torch.stack([torch.as_tensor(v, device=info.device).double() for v in stats.values()])
    return tuple(stats), D.mean_over_ranks(values, info)


def _read(state: TrainState, guard: NonFiniteGuard, window: StatsWindow, diagnostics: Diagnostics | None,
          info: D.DistInfo, out: Path, logger: RunLogger) -> dict[str, Any]:
    """Everything a logging step or checkpoint reports, in one device-to-host copy: the window's means,
    the guard's counters (into ``state``; TrainingDiverged after too many consecutive skipped steps)
    and, with ``diagnostics``, its per-bin averages."""
    keys, sums = window.take()
    bins = diagnostics.take(lambda sums: D.sum_over_ranks(sums, info)) if diagnostics else None
    counters, sums, bins = host_copy([guard.counters, sums, torch.zeros(0) if bins is None else bins])
    bad, state.consecutive_bad = guard.check(counters, state.step, out)
    if bad > state.bad_steps:
        logger.message(f"step {state.step}: {bad - state.bad_steps} step(s) since the last report had a non-finite loss "
                       "or gradient norm and were skipped (weights, optimizer and EMA untouched)")
    state.bad_steps = bad
    return {**window.means(keys, sums), "bad_steps": bad, **(diagnostics.report(bins) if bins else {})}


def _save(out, model, optimizer, ema: EMA, state: TrainState, meta, cfg: Config, info: D.DistInfo) -> Path | None:
    """Write a checkpoint of full (unsharded) state dicts from rank 0; every rank takes part (gathers shards)."""
    path = None
    weights = {"model.safetensors": P.full_state(model.state_dict())}
    for i, name in enumerate(ema.file_names()):
        weights[name] = P.full_state(ema.state_dict(i))
    optimizer_state = P.full_optimizer_state(optimizer)
    if info.is_main:
        files = dict(weights)
        files["trainer_state.pt"] = {
            "step": state.step, "bad_steps": state.bad_steps, "consecutive_bad": state.consecutive_bad,
            "optimizer": optimizer_state, **rng_states(),
        }
        files["meta.json"] = {**meta, "step": state.step}
        files["config.yaml"] = (out / "config.yaml").read_text()
        path = ckpt.save_checkpoint(out / "checkpoints", state.step, files, cfg.train.keep_checkpoints)
    D.barrier(info)
    return path


def _restore(out: Path, spec, model, optimizer, ema: EMA, info: D.DistInfo) -> TrainState:
    """Load the newest complete checkpoint of ``out`` into the live objects."""
    report = print if info.is_main else None
    path = ckpt.latest_checkpoint(out / "checkpoints", report)
    if path is None:
        raise FileNotFoundError(f"--resume {out}: no complete checkpoint under {out / 'checkpoints'}")
    meta = ckpt.read_meta(path)
    if meta.get("model") != spec:
        raise ConfigError(f"checkpoint {path} was trained with model {meta.get('model')} but the config builds {spec}; resume with the run's own config.yaml")
    fill_model(model, ckpt.read_weights(path / "model.safetensors"), f"weights in {path}",
               "different model config? resume with the run's own config.yaml", load=P.load_full_state)
    for i, name in enumerate(ema.file_names()):
        ema.load_state_dict(i, ckpt.read_weights(path / name))
    saved = ckpt.read_state(path)
    load_optimizer_state(optimizer, P.sharded_optimizer_state(optimizer, saved["optimizer"]))
    restore_rng_states(saved)
    if report:
        report(f"resuming from {path} (step {saved['step']})")
    return TrainState(step=saved["step"], bad_steps=saved["bad_steps"], consecutive_bad=saved["consecutive_bad"])


def _meta(spec, data: Dataset, cfg: Config) -> dict[str, Any]:
    guidance = {k: v for k, v in cfg.objective.resolved().items() if k in ("omega", "kappa", "t_start", "t_end", "label_drop")}
    return {
        "format": 1, "model": spec, "objective": cfg.objective.kind, "guidance": guidance,
        "data": {"name": cfg.data.name, "kind": data.kind, "sample_shape": list(data.sample_shape),
                 "num_classes": data.num_classes, "info": data.info},
    }


def _write_samples(net: nn.Module, data: Dataset, cfg: Config, stem: Path, device) -> None:
    """``stem``.png: samples from ``net`` (the EMA model) at 1 NFE, 2 NFE and with the ODE, side by side."""
    save_preview(net, data, stem.with_suffix(".png"), seed=cfg.seed, device=device,
                 plan=preview_plan(cfg.objective.kind, cfg.eval.baseline_ode_steps), omega=cfg.eval.omega,
                 interval=cfg.eval.interval)


def ema_model(spec: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """An eval-mode model of ``spec`` on ``device`` holding the full EMA state dict ``weights`` (float32 shadows
    cast to the model's dtype); built without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        net = build_model(spec)
    return fill_model(net, weights, "the EMA weights", target=spec["name"]).to(device).eval()


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


__all__ = ["TrainState", "TrainingDiverged", "ema_model", "train"]
