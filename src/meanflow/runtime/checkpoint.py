"""Crash-safe checkpoints: safetensors weights + trainer state, written atomically.

Layout of one checkpoint (``RUN/checkpoints/step_0001000/``)::

    model.safetensors        raw weights (a plain state dict)
    ema.safetensors          weights of the first EMA (the others: ema_<decay>.safetensors, ema_std<std>.safetensors)
    trainer_state.pt         optimizer, step, counters, RNG states (tensors and plain types only)
    meta.json                model preset + kwargs, data shape/classes, guidance used in training
    config.yaml              the resolved run config
    COMPLETE                 written last; a directory without it is ignored

Files go into a hidden temporary directory that is renamed into place only once complete
(:func:`meanflow.runtime.files.atomic_path`), so a crash or a full disk never leaves a
half-written checkpoint that looks valid.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_path, fsync_file

MARKER = "COMPLETE"
PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, files: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint atomically under ``root`` and prune to the newest ``keep``.

    ``files`` maps file names to content: ``*.safetensors`` -> state dict, ``*.pt`` -> object for
    torch.save, ``*.json`` -> JSON-able object, other names -> text.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    try:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            for name, content in files.items():
                _write(tmp / name, content)
            _write(tmp / MARKER, f"step {step}\n")
    except OSError as err:
        last = latest_checkpoint(root)
        raise RuntimeError(
            f"could not write checkpoint {final} ({err.strerror or err}); nothing partial was kept. "
            f"Last complete checkpoint: {last if last else 'none'}. Free disk space or change --out."
        ) from err
    _prune(root, keep)
    return final


def complete_checkpoints(root: Path, report=None) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first; partial ones reported and skipped."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".tmp-"):
            if report:
                report(f"skipping partial checkpoint {path.name} (interrupted write)")
            continue
        if not path.name.startswith(PREFIX) or not path.is_dir():
            continue
        if (path / MARKER).exists():
            found.append(path)
        elif report:
            report(f"skipping incomplete checkpoint {path} (no {MARKER} marker)")
    return found


def latest_checkpoint(root: Path, report=None) -> Path | None:
    found = complete_checkpoints(root, report)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a checkpoints directory or a checkpoint directory -> checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run or checkpoint at {path}")
    if path.is_file():
        path = path.parent
    if (path / MARKER).exists():
        return path
    for root in (path / "checkpoints", path):
        last = latest_checkpoint(root)
        if last is not None:
            return last
    raise FileNotFoundError(f"no complete checkpoint under {path} (looked for checkpoints/{PREFIX}*/{MARKER})")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict with an error that names a corrupt file."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RuntimeError(f"checkpoint file {path} is corrupt or unreadable: {err}") from err


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"checkpoint {ckpt} has no readable meta.json: {err}") from err


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged pickles
        raise RuntimeError(f"checkpoint {ckpt}/trainer_state.pt is corrupt or unreadable: {err}") from err


def _write(path: Path, content: Any) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(path))
    elif path.suffix == ".pt":
        torch.save(content, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(content, indent=2))
    else:
        path.write_text(content)
    fsync_file(path)


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
