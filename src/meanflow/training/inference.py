"""Load a trained model from a run directory, a checkpoint directory or a weights file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .builders import build_model


def load_model(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(eval-mode model, checkpoint meta) from a run dir, checkpoint dir or ``*.safetensors`` file.

    ``ema=True`` loads ``ema.safetensors`` (the field's convention for reported numbers); a
    ``*.safetensors`` path loads exactly that file.
    """
    path = Path(path)
    directory = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(directory)
    weights_file = path if path.suffix == ".safetensors" else directory / ("ema.safetensors" if ema else "model.safetensors")
    model = build_model(meta["model"])
    try:
        model.load_state_dict(ckpt.read_weights(weights_file))
    except RuntimeError as err:
        raise RuntimeError(f"weights in {weights_file} do not match the model recorded in {directory}/meta.json: {err}") from err
    return model.to(device).eval(), meta
