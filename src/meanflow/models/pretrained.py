"""Load released or earlier weights into our networks: ``from_pretrained(path)``.

A small registry of checkpoint *formats*, each a ``detect`` (is this file or folder mine?) and a
``load`` (build our network and fill it), tried in registration order. The format found, the
weights taken (EMA or raw) and, for initialisations, the key table are stated, never guessed
silently. Loading is all-or-nothing: every tensor of the new network is filled from the file with
its exact shape, or an error names what is missing, extra or mis-shaped, and no model is returned.

=====================  =====================================================================
format                 what it reads
=====================  =====================================================================
``meanflow-run``       our run directories, checkpoint directories and ``*.safetensors`` files
``py-meanflow``        the official PyTorch CIFAR-10 checkpoint (Gsunshine/py-meanflow):
                       ``torch.save({"model": MeanFlow.state_dict(), "epoch", "args", ...})``,
                       networks ``net``, ``net_ema`` (decay ``args.ema_decay``), ``net_ema1`` ...
``flax-meanflow``      the official JAX checkpoints (Gsunshine/meanflow), written by
                       ``flax.training.checkpoints`` (an Orbax directory or the older msgpack
                       file, or their work directory): ``params`` and ``ema_params`` of
                       ``{"net": DiT}``; needs ``pip install 'meanflow[jax]'``
``dit-pytorch``        facebookresearch DiT and willisma SiT PyTorch checkpoints (a state dict,
                       or a training checkpoint with ``model`` / ``ema``), as *initialisation*
                       of our DiT: their time embedder, their time convention and prediction
                       target differ from MeanFlow's, so train after loading
=====================  =====================================================================

Pickled files are opened with ``torch.load(weights_only=True)``: tensors and plain types only,
plus ``argparse.Namespace`` (the official ``args``); a file that asks for anything else is refused.
A new format is one :func:`register_format` call (``Format(name, doc, detect, load)``).
"""
from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..runtime import checkpoint as ckpt
from .loading import build_model
from .registry import available
from .unet import fir_kernel

ALLOWED_GLOBALS = (argparse.Namespace,)
WEIGHTS = ("ema", "model")


class PretrainedError(ValueError):
    """A checkpoint could not be read or does not fit the network; the message says why and what to do."""


@dataclass
class Loaded:
    """A filled network and how it was obtained.

    model: the network (eval mode); spec: ``{"name", "kwargs"}`` to rebuild it; format: the format's
    name; weights: which weights of the file were taken, in words; table: (source key, our key,
    status) rows for initialisations (status "mapped", "new: ...", "dropped: ..."); info: extra facts.
    """

    model: nn.Module
    spec: dict[str, Any]
    format: str
    weights: str
    table: list[tuple[str, str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the format and the weights taken."""
        return f"format {self.format}: {self.spec['name']} {self.spec['kwargs']}; weights: {self.weights}"

    def table_text(self) -> str:
        """The key table as aligned text (empty when the format maps every key one to one)."""
        if not self.table:
            return ""
        width = max(len(a) for a, _, _ in self.table)
        right = max(len(b) for _, b, _ in self.table)
        return "\n".join(f"{a:<{width}}  ->  {b:<{right}}  {c}" for a, b, c in self.table)


class Source:
    """A path with its contents read lazily and at most once (formats share one read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no checkpoint at {self.path}")

    @cached_property
    def is_torch_file(self) -> bool:
        """A file written by ``torch.save`` (zip container or the legacy pickle stream)."""
        if not self.path.is_file():
            return False
        with self.path.open("rb") as f:
            head = f.read(4)
        return head.startswith(b"PK") or head[:1] == b"\x80"

    @cached_property
    def torch_payload(self) -> Any:
        """The file's object, unpickled with the allow-list only."""
        return safe_torch_load(self.path)


@dataclass(frozen=True)
class Format:
    """A checkpoint format: ``detect(source) -> bool`` and ``load(source, preset, weights, **options) -> Loaded``."""

    name: str
    doc: str
    detect: Callable[[Source], bool]
    load: Callable[..., Loaded]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format; formats are tried in registration order."""
    if fmt.name in FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[str]:
    return list(FORMATS)


def detect(path: str | Path) -> str:
    """The name of the format of ``path``; PretrainedError if none fits."""
    return _detect(Source(path)).name


def load_pretrained(path: str | Path, preset: str | None = None, weights: str = "ema", format: str | None = None,
                    **options: Any) -> Loaded:
    """Read ``path`` into one of our networks (see the module docstring for the formats).

    Args:
        preset: our preset to build (``meanflow.models.available()``); default: the one the file
            implies. A file of another architecture or size than the preset is an error.
        weights: "ema" (default: the main EMA network) or "model" (the raw weights). py-meanflow
            files also take "ema1", "ema2", ... (their extra EMAs).
        format: skip detection and use this format.
        options: format options (dit-pytorch: ``h_embed="copy"|"zero"``).
    """
    source = Source(path)
    if preset is not None and preset.lower() not in available():
        raise PretrainedError(f"unknown preset {preset!r}; available: {', '.join(available())}")
    fmt = FORMATS[format] if format in FORMATS else _detect(source) if format is None else None
    if fmt is None:
        raise PretrainedError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}")
    loaded = fmt.load(source, preset.lower() if preset else None, weights, **options)
    loaded.model.eval()
    return loaded


def from_pretrained(path: str | Path, preset: str | None = None, weights: str = "ema", verbose: bool = True, **options: Any) -> nn.Module:
    """Our network filled from ``path`` (eval mode); prints the format and the weights taken (and the key table)."""
    loaded = load_pretrained(path, preset, weights, **options)
    if verbose:
        print(loaded.describe())
        if loaded.table:
            print(loaded.table_text())
    return loaded.model


def _detect(source: Source) -> Format:
    for fmt in FORMATS.values():
        if fmt.detect(source):
            return fmt
    raise PretrainedError(
        f"{source.path} is in none of the known checkpoint formats ({', '.join(FORMATS)}); see meanflow.models.pretrained"
    )


# Reading files ---------------------------------------------------------------------------------

def safe_torch_load(path: Path) -> Any:
    """``torch.load`` without executing pickled code: tensors, plain types and :data:`ALLOWED_GLOBALS`."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        asked = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(err))
        what = asked.group(1) if asked else "an object"
        raise PretrainedError(
            f"{path} asks to unpickle {what}, which is not on the allow-list ({', '.join(g.__module__ + '.' + g.__qualname__ for g in ALLOWED_GLOBALS)}, "
            "tensors, plain types): refusing to run code from a checkpoint. Re-save the state dict alone "
            "(torch.save(model.state_dict(), path)) from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise PretrainedError(f"{path} is not a complete torch.save file (truncated or corrupt): {err}") from None


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value).copy())


def fill(spec: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """A new network built from ``spec`` whose every tensor comes from ``state``, with exact shapes.

    Raises PretrainedError naming the missing, unexpected and mis-shaped keys (nothing is loaded then).
    """
    try:
        model = build_model(spec)
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"{what}: cannot build {spec['name']} {spec['kwargs']}: {err}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
                 "mis-shaped: " + ", ".join(f"{k} {tuple(state[k].shape)} vs ours {tuple(own[k].shape)}" for k in shapes[:3]) if shapes else ""]
        raise PretrainedError(
            f"{what} does not fit {spec['name']} {spec['kwargs']}: " + "; ".join(p for p in parts if p)
            + ". It is another architecture or size: pass the matching preset (meanflow models)."
        )
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
    return model


def _check_weights(weights: str, allowed: tuple[str, ...]) -> None:
    if weights not in allowed:
        raise PretrainedError(f"weights must be one of {', '.join(allowed)}, got {weights!r}")


# Format: our own runs --------------------------------------------------------------------------

def _is_run(source: Source) -> bool:
    path = source.path
    if path.suffix == ".safetensors":
        return (path.parent / "meta.json").exists()
    if not path.is_dir():
        return False
    try:
        ckpt.resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return True


def _load_run(source: Source, preset: str | None, weights: str) -> Loaded:
    _check_weights(weights, WEIGHTS)
    directory = ckpt.resolve_checkpoint(source.path)
    meta = ckpt.read_meta(directory)
    spec = meta["model"]
    if preset is not None and preset != spec["name"]:
        raise PretrainedError(f"{directory} holds a {spec['name']} model, not {preset}; drop the preset or pass {spec['name']}")
    file = source.path if source.path.suffix == ".safetensors" else directory / f"{weights}.safetensors"
    model = fill(spec, ckpt.read_weights(file), str(file))
    taken = f"{file.name} (step {meta.get('step')})"
    return Loaded(model, spec, "meanflow-run", taken, info={"meta": meta, "checkpoint": str(directory)})


register_format(Format("meanflow-run", "our run / checkpoint directories and weights files", _is_run, _load_run))


# Format: official PyTorch CIFAR-10 -------------------------------------------------------------

def _is_py_meanflow(source: Source) -> bool:
    if not source.is_torch_file:
        return False
    payload = source.torch_payload
    return (isinstance(payload, dict) and isinstance(payload.get("model"), dict)
            and any(k.startswith("net.map_layer0.") for k in payload["model"]))


def official_unet_names(model: nn.Module) -> dict[str, str]:
    """Our U-Net's parameter prefixes -> the official SongUNet's (``enc.32x32_block0``, ``dec.8x8_in0`` ...)."""
    height = model.input_size[0]
    names = {"cond.augment": "map_augment", "cond.layer0": "map_layer0", "cond.layer1": "map_layer1",
             "stem": f"enc.{height}x{height}_conv", "out_norm": f"dec.{height}x{height}_aux_norm",
             "out_conv": f"dec.{height}x{height}_aux_conv"}
    level, index = 0, 0
    for i, block in enumerate(model.encoder):
        if block.mode == "down":
            level, index = level + 1, 0
            names[f"encoder.{i}"] = f"enc.{height >> level}x{height >> level}_down"
        else:
            names[f"encoder.{i}"] = f"enc.{height >> level}x{height >> level}_block{index}"
            index += 1
    for i in range(len(model.middle)):
        names[f"middle.{i}"] = f"dec.{height >> level}x{height >> level}_in{i}"
    index = 0
    for i, block in enumerate(model.decoder):
        if block.mode == "up":
            level, index = level - 1, 0
            names[f"decoder.{i}"] = f"dec.{height >> level}x{height >> level}_up"
        else:
            names[f"decoder.{i}"] = f"dec.{height >> level}x{height >> level}_block{index}"
            index += 1
    return names


def _official_unet_key(ours: str, prefixes: dict[str, str]) -> str:
    """Our U-Net key -> the official key (inside one network), e.g. encoder.5.attn.qkv.weight -> enc.16x16_block0.qkv.weight."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if ours == prefix or ours.startswith(prefix + "."):
            rest = ours[len(prefix) + 1:]
            if rest.startswith("attn."):  # our attention submodule; theirs sits in the block
                layer, tail = rest[len("attn."):].split(".", 1)
                rest = f"{'norm2' if layer == 'norm' else layer}.{tail}"
            return f"{prefixes[prefix]}.{rest}"
    raise KeyError(ours)


def _load_py_meanflow(source: Source, preset: str | None, weights: str) -> Loaded:
    state = source.torch_payload["model"]
    args = source.torch_payload.get("args")
    decays = [getattr(args, "ema_decay", None), *getattr(args, "ema_decays", [])] if args is not None else []
    choices = ("ema", "model", *[f"ema{i}" for i in range(1, len(decays))])
    _check_weights(weights, choices)
    net = {"ema": "net_ema", "model": "net"}.get(weights, f"net_ema{weights[3:]}")
    decay = None if weights == "model" else (decays[int(weights[3:] or 0)] if decays else None)
    prefix = net + "."
    sub = {k[len(prefix):]: _tensor(v) for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise PretrainedError(f"{source.path} has no {net}.* weights (keys start with {sorted({k.split('.')[0] for k in state})})")
    for key in [k for k in sub if k.endswith("resample_filter")]:
        _check_filter(sub.pop(key), key, source.path)
    conv = sub.get(next((k for k in sub if k.endswith("_conv.weight") and k.startswith("enc.")), ""), None)
    if conv is None:
        raise PretrainedError(f"{source.path}: no encoder stem (enc.*_conv.weight) in {net}: not a SongUNet checkpoint")
    size = int(re.match(r"enc\.(\d+)x", next(k for k in sub if k.endswith("_conv.weight") and k.startswith("enc."))).group(1))
    kwargs = {"in_channels": int(conv.shape[1]), "input_size": size, "num_classes": 0,
              "augment_dim": int(sub["map_augment.weight"].shape[1]) if "map_augment.weight" in sub else 0}
    if args is not None and hasattr(args, "dropout"):
        kwargs["dropout"] = float(args.dropout)
    spec = {"name": preset or "unet-cifar10", "kwargs": kwargs}
    model = build_model(spec)
    prefixes = official_unet_names(model)
    renamed = {}
    for ours in model.state_dict():
        theirs = _official_unet_key(ours, prefixes)
        renamed[ours] = sub.pop(theirs) if theirs in sub else None
    state_ours = {k: v for k, v in renamed.items() if v is not None}
    for key in sub:  # keys of theirs we did not place: report them as unexpected
        state_ours[f"(official) {key}"] = sub[key]
    model = fill(spec, state_ours, f"{source.path} ({net})")
    taken = f"{net}" + (f" (EMA, decay {decay})" if decay is not None else " (raw weights, no EMA)")
    return Loaded(model, spec, "py-meanflow", taken, info={"epoch": source.torch_payload.get("epoch")})


def _check_filter(value: torch.Tensor, key: str, path: Path) -> None:
    """The official files store the 2-D resampling filter; ours is [1, 3, 3, 1]: they must agree."""
    expected = fir_kernel((1, 3, 3, 1))
    if tuple(value.shape[-2:]) != tuple(expected.shape) or not torch.allclose(value.reshape(expected.shape).float(), expected):
        raise PretrainedError(f"{path}: {key} is not the [1, 3, 3, 1] filter our U-Net uses; another architecture")


register_format(Format("py-meanflow", "official PyTorch CIFAR-10 checkpoint (torch.save dict with 'model', 'epoch', 'args')",
                       _is_py_meanflow, _load_py_meanflow))
