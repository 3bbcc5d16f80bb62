"""The released iMF weights: ``iMF-{B,M,L,XL}-2.pth`` of the official PyTorch port (Lyy-iiis/imeanflow, branch ``torch``).

Each file is the ``state_dict()`` of the official ``iMeanFlow(model_str, eval=True)``: the network
under ``net.``, linear layers wrapped as ``<layer>._flax_linear.*`` and the label table as
``y_embedder.embedding_table._flax_embedding.weight``. The eval model has no v-head blocks but
still owns ``net.v_final_layer.*`` (a final layer that would read the shared blocks' output);
those weights are checked for shape and not used, since the auxiliary v-head they belong to was
not released. Everything else maps one to one onto :class:`~meanflow.models.imf_dit.IMFDiT`
(built with ``v_head=False``) by renaming; a missing, unexpected or misshaped key is an error
that names it. The weights carry no input size: the official models take 4 x 32 x 32 SD-VAE
latents (256 x 256 images), the default here.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .imf_dit import IMF_PRESETS, IMFDiT
from .registry import create
from .weights import fill_model

OFFICIAL_VAE = "stabilityai/sd-vae-ft-mse"  # the SD-VAE (ft-mse) whose latents the released models take
OFFICIAL_NAMES = {"imfDiT_B_2": "imf-b/2", "imfDiT_M_2": "imf-m/2", "imfDiT_L_2": "imf-l/2", "imfDiT_XL_2": "imf-xl/2"}
UNUSED_PREFIX = "v_final_layer."
_RENAMES = ((re.compile(r"\._flax_linear\."), "."), (re.compile(r"\.embedding_table\._flax_embedding\."), "."))


def is_official_imf(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is in the official iMF layout (the ``net.`` patch embedder and class tokens)."""
    return "net.x_embedder.proj.weight" in state and "net.class_tokens" in state


def rename_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> ours: drop ``net.`` and the ``_flax_linear`` / ``embedding_table._flax_embedding`` wrappers.

    Keys outside ``net.`` are an error. The unused ``v_final_layer.*`` entries stay in the result.
    """
    foreign = sorted(k for k in state if not k.startswith("net."))
    if foreign:
        raise ValueError(f"not an official iMF state dict: keys outside 'net.': {', '.join(foreign[:8])}")
    renamed = {}
    for key, value in state.items():
        name = key[len("net."):]
        for pattern, replacement in _RENAMES:
            name = pattern.sub(replacement, name)
        renamed[name] = value
    return renamed


def official_architecture(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Sizes read from renamed official weights: in_channels, patch, hidden, heads, depth, num_classes."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        head_dim = state["u_heads.0.attn.q_norm.weight"].shape[0]
        num_classes = state["y_embedder.weight"].shape[0] - 1
    except KeyError as err:
        raise ValueError(f"official iMF weights lack {err.args[0]!r}; the file is truncated or not an iMF checkpoint") from err
    shared, head = (_block_count(state, group) for group in ("shared_blocks", "u_heads"))
    return dict(in_channels=in_channels, patch=patch, hidden=hidden, heads=hidden // head_dim,
                depth=shared + head, head_depth=head, num_classes=num_classes)


def _block_count(state: dict[str, torch.Tensor], group: str) -> int:
    """Number of distinct block indices under ``group.<i>.``."""
    return len({m.group(1) for key in state if (m := re.match(rf"{group}\.(\d+)\.", key))})


def official_preset(arch: dict[str, int]) -> str | None:
    """The preset whose (depth, hidden, heads, patch) and head depth 8 match ``arch``, or None."""
    size = (arch["depth"], arch["hidden"], arch["heads"], arch["patch"])
    return next((name for name, preset in IMF_PRESETS.items() if preset == size and arch["head_depth"] == 8), None)


def official_imf_from_state(state: Any, source: str, preset: str | None = None, input_size: int = 32) -> IMFDiT:
    """An eval-mode :class:`IMFDiT` (no v-head) holding the official iMF state dict ``state`` (``source`` names it
    in errors; read by :mod:`meanflow.models.pretrained`, format ``imf-official``).

    The sizes are read off the weights; a file of an official size becomes that preset (its
    ``preset`` attribute selects the recommended sampling guidance), any other size an IMFDiT of
    those sizes. ``preset`` (e.g. ``"imf-b/2"``), when given, must be what the file holds.
    """
    if not isinstance(state, dict) or not is_official_imf(state):
        raise ValueError(f"{source!r} is not an official iMF checkpoint (the state dict of iMeanFlow(eval=True), keys net.*)")
    state = rename_official(state)
    arch = official_architecture(state)
    found = official_preset(arch)
    if preset is not None and preset.lower() != found:
        raise ValueError(f"{source!r} holds {found or 'an iMF model of no official size'} ({_describe(arch)}), not {preset!r}")
    kwargs = official_spec_kwargs(arch, input_size)
    model = create(found, **kwargs) if found else IMFDiT(**kwargs)  # a size of no preset: no released guidance settings
    load_checked(model, state, source)
    return model.eval()


def official_spec_kwargs(arch: dict[str, int], input_size: int = 32) -> dict[str, Any]:
    """Constructor arguments of the inference model for weights of architecture ``arch`` (every size explicit)."""
    sizes = {k: arch[k] for k in ("depth", "hidden", "heads", "patch", "head_depth")}
    return dict(in_channels=arch["in_channels"], input_size=input_size, num_classes=arch["num_classes"], v_head=False, **sizes)


def _describe(arch: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in arch.items())


def load_checked(model: IMFDiT, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy renamed official weights into ``model``; missing, unexpected or misshaped keys are errors naming them.

    The file's unused v-head final layer (``v_final_layer.*``) is checked against the shapes of the
    u-head's final layer, its twin, and then left out.
    """
    expected = model.state_dict()
    twins = {k: expected["u_final_layer." + k[len(UNUSED_PREFIX):]] for k in state
             if k.startswith(UNUSED_PREFIX) and "u_final_layer." + k[len(UNUSED_PREFIX):] in expected}
    fill_model(model, state, f"official iMF weights in {source}", target=model.preset or "the iMF model", spare=twins, shown=10)


def official_meta(model: IMFDiT) -> dict:
    """Checkpoint meta (as a run records it) for a released iMF model: ImageNet 256 as SD-VAE ft-mse
    latents with iMF's per-channel normalisation, named (``latent_norm: imf``; the data floor holds
    its statistics), so ``meanflow sample`` decodes its samples."""
    channels, (height, width) = model.in_channels, model.input_size
    info = {"source": "latents", "vae": OFFICIAL_VAE, "image_size": 8 * height, "latent_norm": "imf"}
    return {"format": 1, "source": "official iMF checkpoint", "step": None, "objective": "imf",
            "model": {"name": model.preset, "kwargs": {"v_head": False}},
            "data": {"name": "imagenet", "kind": "latents", "sample_shape": [channels, height, width],
                     "num_classes": model.num_classes, "info": info}}
