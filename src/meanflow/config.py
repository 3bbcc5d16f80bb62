"""Configuration: typed dataclasses, named YAML presets and ``key=value`` overrides.

A run is described by one :class:`Config`. It is built from a named preset (``configs/NAME.yaml``
shipped with the package) or a user YAML file, then ``key=value`` overrides from the command line
(``train.steps=2000``, ``objective.kind=flow_matching``). Everything is validated here, once, with
messages that name the offending key; math code never sees this module.

The objective section is ``kind`` plus that objective's options, flat (``objective.ratio``); the
options, defaults and ranges are the objective's own (declared once with it, filed in
:mod:`meanflow.options`), and a key the chosen kind does not read is an error. Overriding
``objective.kind`` on the command line keeps the preset's objective options that the new kind
reads and leaves out the others (they belonged to the preset's objective).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import options as opts

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def setting(default: Any, **checks: Any) -> Any:
    """A config field whose default and allowed values (``low``, ``high``, ``above``, ``choices``,
    ``doc``; see :class:`meanflow.options.Option`) are written here, once, next to the field.
    :func:`validate` checks them; the CLI and constructors read the same declaration."""
    return field(default=default, metadata={"option": opts.Option(default, **checks)})


def _declared(cls: type) -> type:
    """Name each field's Option after its field (dataclass fields get no ``__set_name__`` call)."""
    for spec in dataclasses.fields(cls):
        if "option" in spec.metadata:
            spec.metadata["option"].name = spec.name
    return cls


def declared_option(section: type, name: str) -> opts.Option:
    """The Option declared for field ``name`` of config section class ``section`` (e.g. TrainConfig, "num_workers")."""
    return next(f for f in dataclasses.fields(section) if f.name == name).metadata["option"]


@_declared
@dataclass
class ModelConfig:
    """Network preset (see ``meanflow.models.available()``) and its constructor arguments.

    Data-dependent arguments (``dim`` for MLPs, ``in_channels``/``input_size`` for image models,
    ``num_classes``) are filled in from the data set unless given here.
    """

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)


PARALLEL_MODES = ("ddp", "fsdp")  # train.parallel: see meanflow.runtime.distributed
LATENT_NORMALISATIONS = ("vae", "imf")  # data.latent_norm: see meanflow.data.latents
PIXEL_OBJECTIVES = ("pmf",)  # objective kinds that train on pixels only (no VAE latents)


@_declared
@dataclass
class DataConfig:
    """Training data. ``name``: a toy distribution (checkerboard, 8gaussians, moons, spirals),
    ``points`` (a .npy/.npz/.csv file at ``path``), or an image source (digits, folder, npz,
    cifar10, mnist, latents)."""

    name: str = "checkerboard"
    path: str | None = None
    num_samples: int = setting(100_000, above=0, doc="toy points drawn for training")
    image_size: int | None = None
    flip: bool = False
    augment: float = setting(0.0, low=0.0, high=1.0, doc="EDM augmentation probability p (official CIFAR-10: 0.12; 0 = off)")
    conditional: bool = True
    download: bool = False
    holdout: int = setting(10_000, low=0, doc="size of the held-out reference set")
    latent_norm: str = setting("vae", choices=LATENT_NORMALISATIONS,
                               doc="latents only: vae (the VAE's scaling factor) or imf (iMF's per-channel statistics)")


@dataclass
class ObjectiveConfig:
    """The training objective: ``kind`` (``meanflow.objectives.available()``) and the options given
    for it (the others take the objective's defaults). Flat in YAML: ``objective: {kind: meanflow,
    ratio: 0.25}``. ``cfg.objective.ratio`` reads an option's value, given or default."""

    kind: str = "meanflow"
    options: dict = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        """Every option of the kind: given values, else the objective's defaults."""
        return opts.options_of("objective", self.kind).resolve(self.options, "objective.")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.resolved()}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("kind", "options"):
            raise AttributeError(name)
        values = self.resolved()
        if name not in values:
            raise AttributeError(f"objective {self.kind!r} has no option {name!r}")
        return values[name]


OPTIMIZERS = ("adam", "adamw", "muon")  # train.optimizer: see meanflow.training.builders.build_optimizer
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")  # train.muon_adjust_lr: torch.optim.Muon's adjust_lr_fn
LR_DECAYS = ("none", "cosine", "linear")  # train.lr_decay: see meanflow.training.builders.learning_rate
MAX_EMA_STD = 12 ** -0.5  # train.ema_stds: the widest power-function EMA, gamma = 0 (see meanflow.training.ema)


@_declared
@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is the *global* batch (all processes)."""

    steps: int = setting(4000, above=0)
    batch_size: int = setting(1024, above=0, doc="global batch, divisible by the number of processes")
    lr: float = setting(1e-3, above=0.0)
    optimizer: str = setting("adam", choices=OPTIMIZERS,
                             doc="adamw: decoupled weight decay; muon: Muon on the nn.Linear weights, AdamW on the rest (pMF)")
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = setting(0.0, low=0.0)
    muon_momentum: float = setting(0.95, low=0.0, high=1.0, doc="muon: momentum of the Muon part (official pMF: 0.95)")
    muon_ns_steps: int = setting(5, above=0, doc="muon: Newton-Schulz steps of the Muon part (official pMF: 5)")
    muon_adjust_lr: str = setting("original", choices=MUON_LR_ADJUSTMENTS,
                                  doc="muon: the Muon step's scale, sqrt(max(1, fan_out / fan_in)) (original, official pMF) "
                                      "or 0.2 sqrt(max(fan_in, fan_out)) (match_rms_adamw)")
    warmup_steps: int = setting(0, low=0)
    lr_decay: str = setting("none", choices=LR_DECAYS,
                            doc="after warm-up: none (constant, the paper's), cosine or linear down to 0 at the last step")
    grad_clip: float = setting(0.0, low=0.0, doc="max gradient norm; 0 = no clipping")
    ema_decays: list = field(default_factory=lambda: [0.999])  # exponential EMAs (meanflow.training.ema.Exponential)
    ema_rampup: float = setting(0.05, low=0.0, high=1.0,
                                doc="EDM's EMA ramp-up: each exponential EMA's half-life is at most this fraction of the "
                                    "steps so far (0 = off: the plain EMA from the initial weights, as before)")
    ema_stds: list = field(default_factory=list)  # EDM2 power-function EMAs of these relative std's, after the exponential ones
    precision: str = setting("fp32", choices=("fp32", "bf16"))
    compile: bool = False
    parallel: str = setting("ddp", choices=PARALLEL_MODES,
                            doc="several processes: ddp (replicated weights) or fsdp (FSDP2: parameters, gradients and "
                                "optimizer state sharded; one-forward losses, no compile)")
    log_every: int = setting(50, low=0, doc="0 = no log lines")
    sample_every: int = setting(0, low=0, doc="steps between previews and evaluation hooks; 0 = never")
    checkpoint_every: int = setting(1000, low=0)
    keep_checkpoints: int = setting(2, above=0)
    max_bad_steps: int = setting(20, above=0, doc="consecutive non-finite steps before training stops")
    num_workers: int = setting(0, low=0, doc="DataLoader worker processes; 0 = load in the training process")
    device: str = "auto"


@_declared
@dataclass
class EvalConfig:
    """Evaluation after training and by ``meanflow eval``: NFE list, sample count, weights."""

    steps: list = field(default_factory=lambda: [1, 2])
    num_samples: int = setting(10_000, above=0)
    batch_size: int = setting(1000, above=0, doc="sampling batch; the noise of batch i comes from (seed, i)")
    ema: bool = True
    baseline_ode_steps: int = setting(100, above=0)
    omega: float | None = None  # iMF-style models: guidance scale of the evaluation (null: the model's own default)
    interval: list | None = None  # iMF-style models: guidance interval [t_min, t_max] (null: the model's own default)
    fid_stats: str | None = None  # images: reference statistics (meanflow fid-stats) for FID / IS of the run's evaluation


@_declared
@dataclass
class InitConfig:
    """Start from existing weights (``meanflow train --init``): a run or checkpoint directory, or any
    file ``meanflow.models.from_pretrained`` reads. The network and all its EMAs start from the same
    weights; the optimizer, step and schedule start afresh."""

    path: str | None = None
    ema: bool = True  # take the source's EMA weights; false: its raw weights


@dataclass
class Config:
    """A whole run. ``stages``: a multi-stage schedule in one run, a list of ``{steps: N, objective:
    {option: value}}`` (the last stage may omit ``steps``: it runs to ``train.steps``); each stage
    trains with the run's objective updated by its own options (see :func:`stage_objectives`)."""

    seed: int = setting(0, low=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "objective": self.objective.to_dict()}


def available_configs() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML path plus ``key=value`` overrides."""
    raw = _read_yaml(name_or_path) if name_or_path else {}
    pairs = [_split_override(item) for item in overrides]
    kinds = [value for key, value in pairs if key == "objective.kind"]
    if kinds:
        _keep_options_read_by(raw, kinds[-1])
    sources = [value for key, value in pairs if key == "data.name"]
    if sources:
        _keep_data_keys_read_by(raw, sources[-1])
    for key, value in pairs:
        _set_nested(raw, key, value)
    return from_dict(raw)


def _keep_options_read_by(raw: dict[str, Any], kind: Any) -> None:
    """Drop the preset's objective options that objective ``kind`` does not read (kind overridden)."""
    section = raw.get("objective")
    if not isinstance(section, dict) or kind not in opts.kinds("objective"):
        return
    reads = opts.options_of("objective", kind).options
    raw["objective"] = {k: v for k, v in section.items() if k == "kind" or k in reads}


def _keep_data_keys_read_by(raw: dict[str, Any], name: Any) -> None:
    """Drop the preset's data keys that source ``name`` does not read (data.name overridden): they
    belonged to the preset's source. Keys given on the command line are still checked."""
    section = raw.get("data")
    if not isinstance(section, dict) or name not in opts.kinds("data"):
        return
    reads = opts.lookup("data", name).reads
    raw["data"] = {k: v for k, v in section.items() if k in ("name", "conditional", *reads)}


def from_dict(raw: dict[str, Any]) -> Config:
    """Typed, validated config from a nested dict (unknown keys are errors)."""
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate(cfg: Config) -> None:
    """Check choices and ranges; raise :class:`ConfigError` naming the key."""
    for prefix, section in (("", cfg), ("data.", cfg.data), ("train.", cfg.train), ("eval.", cfg.eval)):
        for spec in dataclasses.fields(section):
            if "option" in spec.metadata:
                try:
                    spec.metadata["option"].check(getattr(section, spec.name), owner="config", prefix=prefix)
                except ValueError as err:
                    raise ConfigError(str(err)) from None
    stage_objectives(cfg)
    if cfg.data.name == "latents" and any(objective.kind in PIXEL_OBJECTIVES for _, objective in stage_objectives(cfg)):
        raise ConfigError("objective.kind=pmf trains in pixel space without a VAE, but data.name=latents holds VAE latents; "
                          "train on images (data.name=folder data.path=IMAGES data.image_size=256) or use objective.kind=imf on latents")
    if cfg.train.optimizer == "muon" and cfg.train.parallel == "fsdp":
        raise ConfigError("train.optimizer=muon orthogonalises whole weight matrices, which train.parallel=fsdp shards; "
                          "use train.parallel=ddp (or train.optimizer=adamw with fsdp)")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1); got {cfg.train.betas!r}")
    _validate_emas(cfg.train)
    if not cfg.eval.steps or not all(isinstance(k, int) and k >= 1 for k in cfg.eval.steps):
        raise ConfigError(f"eval.steps must be a non-empty list of positive integers; got {cfg.eval.steps!r}")
    if cfg.eval.omega is not None and not _is_number(cfg.eval.omega):
        raise ConfigError(f"eval.omega must be a number (or null: the model's own); got {cfg.eval.omega!r}")
    if cfg.eval.interval is not None and not (isinstance(cfg.eval.interval, list) and len(cfg.eval.interval) == 2
                                              and all(_is_number(x) for x in cfg.eval.interval)):
        raise ConfigError(f"eval.interval must be two numbers [t_min, t_max] (or null: the model's own); got {cfg.eval.interval!r}")


def _validate_emas(train: TrainConfig) -> None:
    """train.ema_decays in (0, 1), train.ema_stds in (0, MAX_EMA_STD], at least one EMA in all."""
    if not all(_is_number(d) and 0.0 < d < 1.0 for d in train.ema_decays):
        raise ConfigError(f"train.ema_decays must be a list of numbers in (0, 1); got {train.ema_decays!r}")
    if not all(_is_number(s) and 0.0 < s <= MAX_EMA_STD for s in train.ema_stds):
        raise ConfigError(f"train.ema_stds must be a list of numbers in (0, {MAX_EMA_STD:.4f}] (power-function EMA widths, "
                          f"e.g. EDM2's [0.05, 0.1]); got {train.ema_stds!r}")
    if not train.ema_decays and not train.ema_stds:
        raise ConfigError("train.ema_decays and train.ema_stds are both empty; give at least one EMA (e.g. train.ema_decays=[0.999])")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stage_objectives(cfg: Config) -> list[tuple[int, ObjectiveConfig]]:
    """(first step, objective) of every stage of ``cfg.stages``; one stage (0, cfg.objective) without stages.

    A stage's objective is the run's with the stage's options replacing the run's; a stage that
    changes ``kind`` keeps only the run's options the new kind reads.
    """
    if not cfg.stages:
        return [(0, cfg.objective)]
    plan, start = [], 0
    for i, stage in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if not isinstance(stage, dict) or set(stage) - {"steps", "objective"}:
            raise ConfigError(f"{key} must be a mapping with keys steps and objective; got {stage!r}")
        steps, given = stage.get("steps"), stage.get("objective") or {}
        last = i == len(cfg.stages) - 1
        if steps is None and not last:
            raise ConfigError(f"{key}.steps is required (only the last stage may run to train.steps)")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"{key}.steps must be a positive integer; got {steps!r}")
        if not isinstance(given, dict):
            raise ConfigError(f"{key}.objective must be a mapping of objective options; got {given!r}")
        kind = given.get("kind", cfg.objective.kind)
        base = dict(cfg.objective.options)
        if kind != cfg.objective.kind and kind in opts.kinds("objective"):
            base = {k: v for k, v in base.items() if k in opts.options_of("objective", kind).options}
        try:
            objective = _build_objective({**base, **given, "kind": kind})
        except ConfigError as err:
            raise ConfigError(f"{key}.objective: {err}") from None
        plan.append((start, objective))
        start += steps or 0
    if start > cfg.train.steps or (cfg.stages[-1].get("steps") is not None and start != cfg.train.steps):
        raise ConfigError(f"the stages add up to {start} steps but train.steps is {cfg.train.steps}; make them agree or let the last stage omit steps")
    return plan


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        preset = CONFIG_DIR / f"{name_or_path}.yaml"
        if not preset.exists():
            hint = difflib.get_close_matches(name_or_path, available_configs(), n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config {name_or_path!r}; presets: {', '.join(available_configs())}.{extra}")
        path = preset
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (for example train.steps=1000)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_nested(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            extra = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{extra} (known: {', '.join(prefix + f for f in fields)})")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _build_objective(raw: Any) -> ObjectiveConfig:
    """The objective section: its kind's options checked by the objective's own declarations.

    A null value means the objective's default.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"objective must be a mapping, got {raw!r}")
    given = {k: v for k, v in raw.items() if k != "kind" and v is not None}
    section = ObjectiveConfig(kind=raw.get("kind", ObjectiveConfig.kind), options=given)
    try:
        section.resolved()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return section


def _coerce(hint, value: Any, key: str):
    if hint is ObjectiveConfig:
        return _build_objective(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    if hint is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return dict(value)
    return value
