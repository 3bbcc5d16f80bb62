"""Load released or earlier weights into our networks: ``from_pretrained(path)``, the one weights
reader behind ``meanflow sample``, ``meanflow eval``, ``train --init`` and ``meanflow import``.

A small registry of checkpoint *formats*, each a ``detect`` (is this file or folder mine?) and a
``load`` (build our network and fill it), tried in registration order. The format found, the
weights taken (EMA or raw) and, for initialisations, the key table are stated, never guessed
silently. Formats are recognised by content (file headers, keys, folder layout), never by a file
name's suffix alone. Loading is all-or-nothing: every tensor of the new network is filled from the
file with its exact shape (:func:`meanflow.models.weights.fill_model`), or an error names what is
missing, extra or mis-shaped, and no model is returned. Each :class:`Loaded` carries the meta a run
records (``Loaded.run_meta()``), so sampling and evaluation take any format.

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
``imf-official``       the released iMF weights ``iMF-{B,M,L,XL}-2.pth`` (Lyy-iiis/imeanflow,
                       branch ``torch``): the state dict of ``iMeanFlow(eval=True)``, keys ``net.*``
                       (:mod:`meanflow.models.imf_weights`); option ``input_size`` (default 32)
``pmf-official``       the released pMF checkpoints (Lyy-iiis/pMF): flax Orbax directories of the
                       pMF MiT (:mod:`meanflow.models.pmf_weights`, registered before
                       ``flax-meanflow``)
=====================  =====================================================================

A zip archive of a checkpoint directory (the official JAX releases, as downloaded) is unpacked into
a temporary directory for the load. ``from_pretrained("owner/repo", filename="file")`` fetches a
file of the Hugging Face hub into huggingface_hub's cache first (:mod:`meanflow.models.hub`).

Pickled files are opened with ``torch.load(weights_only=True)``: tensors and plain types only,
plus ``argparse.Namespace`` (the official ``args``); a file that asks for anything else is refused.
A new format is one :func:`register_format` call (``Format(name, doc, detect, load)``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import load_config, save_config
from ..runtime import checkpoint as ckpt
from .dit import DIT_PRESETS, sincos_2d
from .hub import hub_file
from .imf_weights import (OFFICIAL_VAE, is_official_imf, official_architecture, official_imf_from_state, official_meta,
                          official_spec_kwargs, rename_official)
from .registry import available, create
from .unet import fir_kernel
from .weights import PretrainedError, fill_model

ALLOWED_GLOBALS = (argparse.Namespace,)
WEIGHTS = ("ema", "model")


@dataclass
class Loaded:
    """A filled network and how it was obtained.

    model: the network (eval mode); spec: ``{"name", "kwargs"}`` to rebuild it; format: the format's
    name; weights: which weights of the file were taken, in words; table: (source key, our key,
    status) rows for initialisations (status "mapped", "new: ...", "dropped: ..."); info: extra facts;
    meta: what a run's checkpoint records (``meta.json``: model, objective, data), when the format
    knows it (our runs, released iMF weights); see :meth:`run_meta`.
    """

    model: nn.Module
    spec: dict[str, Any]
    format: str
    weights: str
    table: list[tuple[str, str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] | None = None

    def run_meta(self, vae: str | None = None) -> dict[str, Any]:
        """The checkpoint meta of these weights: the file's own, else the data an import records for the
        network's family (:data:`IMPORT_DATA`; ``vae``: the VAE to decode latents with)."""
        if self.meta is not None:
            return self.meta
        family = self.spec["name"].split("-")[0]
        if family not in IMPORT_DATA:
            raise PretrainedError(f"no data description for {self.spec['name']} weights (known families: {', '.join(IMPORT_DATA)})")
        data = IMPORT_DATA[family][1]
        kwargs = self.spec["kwargs"]
        data = {**data, "sample_shape": [kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"]],
                "num_classes": kwargs.get("num_classes", 0), "info": {**data["info"], **({"vae": vae} if vae else {})}}
        return {"format": 1, "model": self.spec, "objective": "meanflow", "data": data, "step": None}

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
    def head(self) -> bytes:
        """The first 4 bytes of a file (b"" for a directory)."""
        if not self.path.is_file():
            return b""
        with self.path.open("rb") as f:
            return f.read(4)

    @cached_property
    def is_torch_file(self) -> bool:
        """A file written by ``torch.save`` (zip container holding ``data.pkl``, or the legacy pickle stream)."""
        return self.head[:1] == b"\x80" or (self.head.startswith(b"PK") and _holds_pickle(self.path))

    @cached_property
    def unpacked(self) -> Path:
        """The path itself, or for a zip archive that is not a torch.save file the directory it
        unpacks to (a temporary directory, removed with this Source; a single top folder is entered)."""
        if not self.head.startswith(b"PK") or self.is_torch_file:
            return self.path
        self._unzipped = tempfile.TemporaryDirectory(prefix="meanflow-unzip-")
        root = Path(self._unzipped.name)
        try:
            with zipfile.ZipFile(self.path) as archive:
                archive.extractall(root)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise PretrainedError(f"{self.path} is a zip archive that cannot be unpacked ({type(err).__name__}: {err}); download it again") from None
        entries = [e for e in root.iterdir() if e.name != "__MACOSX"]
        return entries[0] if len(entries) == 1 and entries[0].is_dir() else root

    @cached_property
    def flax_checkpoint(self) -> Path | None:
        """The flax checkpoint (Orbax directory or msgpack file) this source holds, or None."""
        return None if self.is_torch_file else _flax_checkpoint(self.unpacked)

    @cached_property
    def flax_tree(self) -> dict[str, Any]:
        """The nested keys of the flax checkpoint, leaves with ``.shape`` (Orbax: metadata only, no array read)."""
        return flax_tree(self.flax_checkpoint)

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


def register_format(fmt: Format, before: str | None = None) -> Format:
    """Add a format; formats are tried in registration order, or just before the format ``before``."""
    if fmt.name in FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    if before is not None and before not in FORMATS:
        raise ValueError(f"cannot register {fmt.name!r} before unknown format {before!r}")
    order = list(FORMATS.items())
    at = len(order) if before is None else [name for name, _ in order].index(before)
    FORMATS.clear()
    FORMATS.update(order[:at] + [(fmt.name, fmt)] + order[at:])
    return fmt


def formats() -> list[str]:
    return list(FORMATS)


def detect(path: str | Path) -> str:
    """The name of the format of ``path``; PretrainedError if none fits."""
    return _detect(Source(path)).name


def load_pretrained(path: str | Path, preset: str | None = None, weights: str = "ema", format: str | None = None,
                    filename: str | None = None, revision: str | None = None, **options: Any) -> Loaded:
    """Read ``path`` into one of our networks (see the module docstring for the formats).

    Args:
        path: a local file or directory, or with ``filename`` a Hugging Face hub repository id.
        preset: our preset to build (``meanflow.models.available()``); default: the one the file
            implies. A file of another architecture or size than the preset is an error.
        weights: "ema" (default: the main EMA network) or "model" (the raw weights). py-meanflow
            files also take "ema1", "ema2", ... (their extra EMAs); pMF files "ema500", "ema1000" ...
        format: skip detection and use this format.
        filename, revision: the file of hub repository ``path`` (and its branch, tag or commit),
            fetched into huggingface_hub's cache (:func:`meanflow.models.hub.hub_file`).
        options: format options (dit-pytorch: ``h_embed="copy"|"zero"``).
    """
    if filename is not None:
        path = hub_file(str(path), filename, revision)
    elif revision is not None:
        raise PretrainedError("revision= selects a version of a hub file: pass filename= too")
    source = Source(path)
    if preset is not None and preset.lower() not in available():
        raise PretrainedError(f"unknown preset {preset!r}; available: {', '.join(available())}")
    fmt = FORMATS[format] if format in FORMATS else _detect(source) if format is None else None
    if fmt is None:
        raise PretrainedError(f"unknown checkpoint format {format!r}; known: {', '.join(FORMATS)}")
    takes = set(inspect.signature(fmt.load).parameters) - {"source", "preset", "weights"}
    if set(options) - takes:
        raise PretrainedError(f"format {fmt.name} takes no option {', '.join(sorted(set(options) - takes))} (it takes: {', '.join(sorted(takes)) or 'none'})")
    loaded = fmt.load(source, preset.lower() if preset else None, weights, **options)
    loaded.model.eval()
    loaded.info["source"] = str(source.path)
    return loaded


def from_pretrained(path: str | Path, preset: str | None = None, weights: str = "ema", verbose: bool = True,
                    filename: str | None = None, revision: str | None = None, **options: Any) -> nn.Module:
    """Our network filled from ``path`` (eval mode); prints the format and the weights taken (and the key table).

    ``from_pretrained("Lyy0725/pMF", filename="pMF-B-16.zip")`` reads a file of the Hugging Face hub
    (see :func:`load_pretrained`).
    """
    loaded = load_pretrained(path, preset, weights, filename=filename, revision=revision, **options)
    if verbose:
        print(loaded.describe())
        if loaded.table:
            print(loaded.table_text())
    return loaded.model


def load_official_imf(path: str | Path, preset: str | None = None, input_size: int = 32,
                      device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode iMF network (no v-head) holding the released iMF weights in ``path`` (format
    ``imf-official``, :mod:`meanflow.models.imf_weights`); ``preset``, when given, must be what the file holds."""
    return load_pretrained(path, preset, format="imf-official", input_size=input_size).model.to(device)


# What an imported run records about its data: (config preset, data meta), by network family.
IMPORT_DATA = {
    "unet": ("cifar10", {"name": "cifar10", "kind": "images", "info": {}}),
    "dit": ("imagenet-b4", {"name": "latents", "kind": "latents",
                            "info": {"vae": OFFICIAL_VAE, "latent_scale": 0.18215, "latent_shift": 0.0}}),
}


def save_as_run(loaded: Loaded, out: str | Path, vae: str | None = None) -> Path:
    """Write ``loaded`` as a run directory (``meanflow import``): config.yaml and one checkpoint (step 0).

    ``model.safetensors`` and ``ema.safetensors`` both hold the weights taken, so ``sample``, ``eval``
    and ``train --init`` read it like any run; ``import.json`` records the source, format, weights and
    key table. U-Nets are recorded as CIFAR-10 images, DiTs as ImageNet SD-VAE latents (``vae``:
    the VAE to decode with, default the official ft-mse, scale 0.18215).
    """
    out = Path(out)
    if ckpt.latest_checkpoint(out / "checkpoints") is not None:
        raise PretrainedError(f"{out} already holds checkpoints; choose another --out")
    family = loaded.spec["name"].split("-")[0]
    if family not in IMPORT_DATA:
        raise PretrainedError(f"no data description for {loaded.spec['name']} imports (known families: {', '.join(IMPORT_DATA)})")
    meta = dict(loaded.run_meta(vae))
    kwargs = loaded.spec["kwargs"]
    cfg = load_config(IMPORT_DATA[family][0], [f"model.name={loaded.spec['name']}", "model.kwargs={}", "train.steps=1"])
    cfg.model.kwargs = {k: v for k, v in kwargs.items() if k not in ("in_channels", "input_size", "num_classes")}
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    weights = loaded.model.state_dict()
    record = {"source": str(loaded.info.get("source", "")), "format": loaded.format, "weights": loaded.weights,
              "table": [list(row) for row in loaded.table]}
    meta |= {"step": 0, "imported": record}
    ckpt.save_checkpoint(out / "checkpoints", 0, {"model.safetensors": weights, "ema.safetensors": weights,
                                                  "meta.json": meta, "config.yaml": (out / "config.yaml").read_text()}, keep=1)
    (out / "import.json").write_text(json.dumps(record, indent=2))
    return out


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


def _holds_pickle(path: Path) -> bool:
    """Whether a zip file is a torch.save container (it holds ``<name>/data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):  # damaged (truncated): the first entries' local headers still name them
        with path.open("rb") as f:
            return b"data.pkl" in f.read(1 << 20)


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value).copy())


def build(spec: dict[str, Any], what: str) -> nn.Module:
    """A freshly initialised network of ``spec`` ``{"name", "kwargs"}``; PretrainedError naming ``what`` if it cannot be built."""
    try:
        return create(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"{what}: cannot build {spec['name']} {spec['kwargs']}: {err}") from None


def fill(spec: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """A new network built from ``spec`` whose every tensor comes from ``state``, with exact shapes
    (:func:`~meanflow.models.weights.fill_model`: PretrainedError naming the missing, unexpected and
    mis-shaped keys, nothing loaded)."""
    return fill_model(build(spec, what), state, what, "it is another architecture or size: pass the matching preset (meanflow models)",
                      target=f"{spec['name']} {spec['kwargs']}")


def _check_weights(weights: str, allowed: tuple[str, ...]) -> None:
    if weights not in allowed:
        raise PretrainedError(f"weights must be one of {', '.join(allowed)}, got {weights!r}")


# Format: our own runs --------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    """A safetensors file by content: an 8-byte little-endian header length, then a JSON header."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8 and head[8:9] == b"{"


def _is_run(source: Source) -> bool:
    path = source.path
    if path.is_file():
        return _is_safetensors(path) and (path.parent / "meta.json").exists()
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
    file = source.path if source.path.is_file() else directory / f"{weights}.safetensors"
    model = fill_model(build(spec, str(file)), ckpt.read_weights(file), f"weights in {file}",
                       f"the model recorded in {directory}/meta.json is another one (different model config?)")
    taken = f"{file.name} (step {meta.get('step')})"
    return Loaded(model, spec, "meanflow-run", taken, info={"meta": meta, "checkpoint": str(directory)}, meta=meta)


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
    model = build(spec, str(source.path))
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


# DiT-family key names (facebookresearch DiT, willisma SiT, and the official JAX code once normalised)

_DIT_RULES = (
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"([th])_embedder\.mlp\.(0|2)\.(weight|bias)", r"cond.\1_embed.mlp.\2.\3"),
    (r"y_embedder\.embedding_table\.weight", r"cond.y_embed.table.weight"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.3.\2"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.ada.1.\2"),
    (r"final_layer\.linear\.(weight|bias)", r"final.linear.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final.ada.1.\1"),
)


def dit_key(name: str) -> str | None:
    """A DiT-layout key (``blocks.3.mlp.fc1.weight``) -> ours (``blocks.3.mlp.0.weight``), or None."""
    for pattern, target in _DIT_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _dit_spec(state: dict[str, torch.Tensor], preset: str | None, input_size: int | None, what: str) -> dict[str, Any]:
    """Our DiT spec from DiT-layout weights (ours names): sizes read off the tensors, heads from the preset."""
    try:
        conv = state["patch_embed.proj.weight"]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        table = state["cond.y_embed.table.weight"]
    except KeyError as err:
        raise PretrainedError(f"{what} has no {err.args[0]} (after renaming): not a DiT checkpoint") from None
    hidden, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    matches = [n for n, (d, h, _, p) in DIT_PRESETS.items() if (d, h, p) == (depth, hidden, patch)]
    name = preset or (matches[0] if matches else None)
    if name is None:
        raise PretrainedError(f"{what}: depth {depth}, width {hidden}, patch {patch} match none of our DiT presets; pass preset=")
    if name not in DIT_PRESETS or DIT_PRESETS[name][:2] + DIT_PRESETS[name][3:] != (depth, hidden, patch):
        raise PretrainedError(f"{what} is a DiT of depth {depth}, width {hidden}, patch {patch}, not {name}"
                              + (f"; it matches {', '.join(matches)}" if matches else ""))
    kwargs = {"in_channels": channels, "input_size": input_size or 32, "num_classes": int(table.shape[0]) - 1}
    return {"name": name, "kwargs": kwargs}


# Format: official JAX checkpoints (flax.training.checkpoints) ---------------------------------

_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")


def _is_msgpack(path: Path) -> bool:
    """A msgpack map (flax's legacy checkpoint file): first byte a fixmap (0x81-0x8f) or map16/map32."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(2)
    return bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)) and not (head[0] == 0x80 or head[:2] == b"PK")


def _flax_checkpoint(path: Path) -> Path | None:
    """The checkpoint (Orbax directory or msgpack file) at ``path``, or the newest ``checkpoint_<step>`` in it."""
    if _is_msgpack(path) or (path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)):
        return path
    if path.is_dir():
        steps = [(int(m.group(1)), c) for c in path.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", c.name))]
        if steps:
            return _flax_checkpoint(max(steps, key=lambda s: s[0])[1])
    return None


def _is_flax(source: Source) -> bool:
    return source.flax_checkpoint is not None


Prune = Callable[[dict[str, Any]], dict[str, Any]]


def read_flax_state(path: Path, keep: Prune | None = None) -> dict[str, Any]:
    """The restored state dict (nested dicts of numpy arrays) of a flax checkpoint; needs ``meanflow[jax]``.

    ``path`` may be relative (Orbax itself takes only absolute paths). ``keep`` maps the checkpoint's
    tree (:func:`flax_tree`) to the part to read: an Orbax checkpoint then reads only those arrays
    (one EMA of a training state, not its optimizer state); a msgpack file is read whole and pruned.
    """
    target = _flax_target(path)
    try:
        if target.is_file():
            state = _read_msgpack(target)
            return keep(state) if keep else state
        return _read_orbax(target, keep)
    except PretrainedError:
        raise
    except Exception as err:  # flax / orbax / msgpack raise many types; their message names the cause
        raise PretrainedError(f"{target} could not be read as a flax checkpoint: {type(err).__name__}: {err}") from None


def flax_tree(path: Path) -> dict[str, Any]:
    """The nested keys of a flax checkpoint, each leaf with a ``.shape``: Orbax metadata (no array is
    read), or the arrays of a msgpack file."""
    target = _flax_target(path)
    try:
        return _read_msgpack(target) if target.is_file() else _orbax_metadata(target)
    except PretrainedError:
        raise
    except Exception as err:
        raise PretrainedError(f"{target} could not be read as a flax checkpoint: {type(err).__name__}: {err}") from None


def _flax_target(path: Path) -> Path:
    """The checkpoint at ``path`` as an absolute path; flax and Orbax must be importable."""
    try:
        import flax  # noqa: F401, PLC0415 (optional dependency)
        import orbax.checkpoint  # noqa: F401, PLC0415
    except ImportError as err:
        raise PretrainedError(f"{path} is a JAX (flax) checkpoint; reading it needs {err.name}: pip install 'meanflow[jax]'") from None
    target = _flax_checkpoint(Path(path).resolve())
    if target is None:
        raise PretrainedError(f"{path} is not a flax checkpoint (no Orbax directory, msgpack file or checkpoint_<step> in it)")
    return target


def _read_msgpack(target: Path) -> dict[str, Any]:
    from flax import serialization  # noqa: PLC0415

    state = serialization.msgpack_restore(target.read_bytes())
    if not isinstance(state, dict):
        raise PretrainedError(f"{target} does not hold a state dict (got {type(state).__name__})")
    return state


def _orbax_metadata(target: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    meta = ocp.PyTreeCheckpointer().metadata(str(target))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)  # StepMetadata (newer Orbax) or the tree
    if not isinstance(tree, dict):
        raise PretrainedError(f"{target} does not hold a state dict (got {type(tree).__name__})")
    return tree


def _read_orbax(target: Path, keep: Prune | None) -> dict[str, Any]:
    """The arrays of ``keep(tree)`` (all without ``keep``) as numpy arrays, whatever sharding they were saved with."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    tree = _orbax_metadata(target)
    wanted = keep(tree) if keep else tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    request = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=keep is not None)
    return ocp.PyTreeCheckpointer().restore(str(target), args=request)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def torch_layout(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Flax params (nested) -> flat torch names and layouts, float32, for the official JAX networks.

    Dense kernels (in, out) are transposed; convolution kernels (kh, kw, C, D) become (D, C, kh, kw);
    ``kernel`` and ``embedding`` become ``weight``; ``layers_i`` of flax Sequentials become ``i``;
    the official wrapper names ``_flax_linear`` / ``_flax_embedding`` are dropped.
    """
    out = {}
    for name, value in _flatten(params).items():
        array = _tensor(value).float()
        torch_name = re.sub(r"\.layers_(\d+)", r".\1", name).replace("._flax_linear", "").replace("._flax_embedding", "")
        if torch_name.endswith(".kernel"):
            array = array.permute(3, 2, 0, 1) if array.ndim == 4 else array.T if array.ndim == 2 else array
            torch_name = torch_name[: -len("kernel")] + "weight"
        elif torch_name.endswith(".embedding"):
            torch_name = torch_name[: -len("embedding")] + "weight"
        out[torch_name] = array.contiguous()
    return out


def flax_dit_state(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The official JAX DiT's params (``{"net": ...}``) -> our DiT state dict (names and layouts)."""
    return {dit_key(name) or f"(official) {name}": array for name, array in torch_layout(params.get("net", params)).items()}


def _load_flax(source: Source, preset: str | None, weights: str, input_size: int | None = None) -> Loaded:
    _check_weights(weights, WEIGHTS)
    tree = source.flax_tree
    key = "ema_params" if weights == "ema" else "params"
    if "params" not in tree:
        raise PretrainedError(f"{source.path} has no 'params' (top-level keys: {sorted(tree)}): not a flax TrainState checkpoint")
    net = tree["params"].get("net", tree["params"])
    if not isinstance(net, dict) or "x_embedder" not in net or not any(re.fullmatch(r"blocks(_\d+)?", k) for k in net):
        raise PretrainedError(f"{source.path} is a flax checkpoint of an unknown layout: its params hold {', '.join(sorted(net)[:12])}; "
                              "known: the MeanFlow DiT (x_embedder, blocks) and the pMF MiT (x_embedder, shared_blocks_<i>)")
    if key not in tree:
        raise PretrainedError(f"{source.path} has no '{key}' (keys: {sorted(tree)}); weights='model' takes 'params'")
    state = read_flax_state(source.flax_checkpoint, keep=lambda t: {k: t[k] for k in (key, "step") if k in t})
    ours = flax_dit_state(state[key])
    spec = _dit_spec(ours, preset, input_size, str(source.path))
    model = fill(spec, ours, f"{source.path} ({key})")
    taken = f"{key} ({'EMA' if key == 'ema_params' else 'raw weights'}), step {_scalar(state.get('step'))}"
    return Loaded(model, spec, "flax-meanflow", taken, info={"step": _scalar(state.get("step"))})


def _scalar(value: Any) -> Any:
    return None if value is None else np.asarray(value).reshape(-1)[0].item()


register_format(Format("flax-meanflow", "official JAX MeanFlow checkpoints (flax.training.checkpoints: Orbax dir or msgpack)",
                       _is_flax, _load_flax))


# Format: facebookresearch DiT / willisma SiT PyTorch checkpoints, as initialisation -------------

def _dit_torch_state(payload: Any, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, which weights) of a DiT / SiT file: a plain state dict or a training checkpoint."""
    if isinstance(payload, dict) and "ema" in payload and isinstance(payload["ema"], dict):
        _check_weights(weights, WEIGHTS)
        return payload[weights], f"'{weights}' of the training checkpoint" + (" (EMA)" if weights == "ema" else " (raw weights)")
    if weights != "ema":
        raise PretrainedError("this DiT / SiT file holds one set of weights (the released files are the EMA); use weights='ema'")
    return payload, "the file's only weights (released DiT / SiT files hold the EMA)"


def _is_dit_torch(source: Source) -> bool:
    if not source.is_torch_file:
        return False
    payload = source.torch_payload
    state = payload.get("ema", payload) if isinstance(payload, dict) else None
    return isinstance(state, dict) and "x_embedder.proj.weight" in state and "t_embedder.mlp.0.weight" in state


def _load_dit_torch(source: Source, preset: str | None, weights: str, h_embed: str = "copy") -> Loaded:
    if h_embed not in ("copy", "zero"):
        raise PretrainedError(f"h_embed must be 'copy' (the time embedder's weights) or 'zero' (output layer zero), got {h_embed!r}")
    raw, taken = _dit_torch_state(source.torch_payload, weights)
    state, table = {}, []
    for name, value in raw.items():
        ours = dit_key(name)
        if ours is not None:
            state[ours] = _tensor(value).float()
            table.append((name, ours, "mapped"))
    conv = state.get("patch_embed.proj.weight")
    pos = raw.get("pos_embed")
    size = int(round((pos.shape[1]) ** 0.5)) * int(conv.shape[2]) if pos is not None and conv is not None else None
    spec = _dit_spec(state, preset, size, str(source.path))
    channels = spec["kwargs"]["in_channels"]
    final = state["final.linear.weight"]
    patch = int(conv.shape[2])
    if final.shape[0] == 2 * patch * patch * channels:  # learn_sigma: outputs (p, p, 2C), C fastest; keep the first C
        keep = torch.arange(2 * patch * patch * channels).reshape(patch, patch, 2 * channels)[..., :channels].reshape(-1)
        state["final.linear.weight"], state["final.linear.bias"] = final[keep], state["final.linear.bias"][keep]
        table = [(a, b, "mapped (first C of 2C outputs: the variance half dropped)" if b.startswith("final.linear") else c) for a, b, c in table]
    for which in ("weight", "bias"):
        for layer in ("0", "2"):
            source_key = f"cond.t_embed.mlp.{layer}.{which}"
            value = state[source_key].clone()
            if h_embed == "zero" and layer == "2":
                value.zero_()
            state[f"cond.h_embed.mlp.{layer}.{which}"] = value
            table.append(("-", f"cond.h_embed.mlp.{layer}.{which}", f"new: {'zero' if h_embed == 'zero' and layer == '2' else 'copied from ' + source_key}"))
    for name in raw:
        if dit_key(name) is None:
            table.append((name, "-", "dropped" + (" (fixed sin-cos table, the same as ours)" if name == "pos_embed" and _same_pos(raw[name], spec) else "")))
    model = fill(spec, state, str(source.path))
    return Loaded(model, spec, "dit-pytorch", taken, table=table, info={"h_embed": h_embed})


def _same_pos(value: torch.Tensor, spec: dict[str, Any]) -> bool:
    """Whether a stored DiT position table equals our fixed one."""
    grid = spec["kwargs"]["input_size"] // DIT_PRESETS[spec["name"]][3]
    ours = sincos_2d(value.shape[-1], grid, grid)
    return tuple(value.shape[-2:]) == tuple(ours.shape) and torch.allclose(value.reshape(ours.shape).float(), ours, atol=1e-5)


register_format(Format("dit-pytorch", "facebookresearch DiT / willisma SiT PyTorch checkpoints (initialisation of our DiT)",
                       _is_dit_torch, _load_dit_torch))


# Released iMF weights (Lyy-iiis/imeanflow, branch torch): meanflow.models.imf_weights ---------------

def _is_official_imf(source: Source) -> bool:
    return source.is_torch_file and isinstance(source.torch_payload, dict) and is_official_imf(source.torch_payload)


def _load_official_imf(source: Source, preset: str | None, weights: str, input_size: int = 32) -> Loaded:
    """The file holds one set of weights (the released ones): ``weights`` has nothing to choose."""
    model = official_imf_from_state(source.torch_payload, str(source.path), preset, input_size)
    arch = official_architecture(rename_official(source.torch_payload))
    spec = {"name": model.preset or "imf-tiny/2", "kwargs": official_spec_kwargs(arch, input_size)}
    return Loaded(model, spec, "imf-official", "the released weights (the file holds one set)", meta=official_meta(model))


register_format(Format("imf-official", "released iMF checkpoints iMF-{B,M,L,XL}-2.pth (state dict of iMeanFlow(eval=True), keys net.*)",
                       _is_official_imf, _load_official_imf))
