"""The released pMF checkpoints (Lyy-iiis/pMF): ``pMF-{B,L,H}-{16,32}.zip``, their ``-full`` twins,
and the PyTorch port's ``pMF-{B,L,H}-{16,32}.pt`` (branch ``torch``).

Each zip holds a flax ``TrainState`` written by ``flax.training.checkpoints`` (an Orbax directory):
``params`` and ``ema_params`` of the official ``pixelMeanFlow``, whose network is ``net`` (the
official ``pmfDiT``, our :class:`~meanflow.models.mit.MiT`). The training recipe keeps several EDM
EMAs, so ``ema_params`` maps each EMA's half-life (in thousands of images: "500", "1000", "2000")
to a copy of the params; the inference checkpoints leave out the auxiliary v-head, the full ones
keep it (and the optimizer state, which is not read: Orbax restores only the weights asked for).

``weights="ema"`` (default) takes the EMA the official evaluation uses for that model
(:data:`OFFICIAL_EMA`), or the only one; ``weights="ema1000"`` a given one; ``weights="model"`` the
raw params. Sizes are read off the weights' shapes; official sizes become their preset (with its
prior scale and sampling guidance), and a ``preset`` that is not what the file holds is an error.
Names map by renaming: flax kernels transposed, ``shared_blocks_3`` -> ``shared_blocks.3``, the
leading axis of the token, position and label tables dropped. A missing, extra or misshaped tensor
is an error that names it.

The PyTorch port's ``.pt`` file is the state dict of its ``pixelMeanFlow(eval=True)``: the network
under ``net.``, linear layers wrapped as ``<layer>._flax_linear``, the label table as
``embedding_table._flax_embedding``, the rotary table stored as a buffer (``rope_freqs``, not
read: ours is computed); one set of weights, the released EMA.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .imf_weights import rename_official
from .imf_dit import PREFIX
from .mit import NOISE_SCALE, PMF_PRESETS
from .pretrained import Format, Loaded, Source, fill, read_flax_state, register_format, torch_layout
from .weights import PretrainedError

FORMAT = "pmf-official"
# The EMA (half-life, thousands of images) of each released model's reported FID
# (configs/eval_config.yml of branches main and hsdp: `emas`).
OFFICIAL_EMA = {"pmf-b/16": "2000", "pmf-b/32": "2000", "pmf-l/16": "1000", "pmf-l/32": "2000", "pmf-h/16": "1000", "pmf-h/32": "500"}
_BLOCK = re.compile(r"^(shared_blocks|u_heads|v_heads)_(\d+)\.")
_TABLES = re.compile(r"^(\w+_tokens|pos_embed|y_embedder\.weight)$")  # stored (1, n, D) officially


def net_tree(params: Any) -> dict[str, Any] | None:
    """The pmfDiT subtree of a params tree (under ``net``), or None if it is not one."""
    net = params.get("net", params) if isinstance(params, dict) else None
    if isinstance(net, dict) and isinstance(net.get("x_embedder"), dict) and "proj1" in net["x_embedder"] and "shared_blocks_0" in net:
        return net
    return None


def weight_choices(tree: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The weights a pMF checkpoint tree holds: {"model": ("params",), "ema2000": ("ema_params", "2000"), ...}.

    A single EMA stored directly as ``ema_params`` (not keyed by half-life) is ``"ema"``.
    """
    choices = {"model": ("params",)} if net_tree(tree.get("params")) else {}
    ema = tree.get("ema_params")
    if net_tree(ema):
        choices["ema"] = ("ema_params",)
    elif isinstance(ema, dict):
        choices.update({f"ema{key}": ("ema_params", key) for key in sorted(ema, key=_half_life) if net_tree(ema[key])})
    return choices


def _half_life(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return float("inf")


def _subtree(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def is_official_pmf(tree: dict[str, Any]) -> bool:
    """Whether a flax checkpoint tree is a pMF state (some weights of it hold a pmfDiT)."""
    return isinstance(tree, dict) and bool(weight_choices(tree))


def architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sizes of a MiT from its state dict's shapes (meta tensors will do): see :class:`~meanflow.models.mit.MiT`."""
    try:
        bottleneck, in_channels, patch, _ = state["x_embedder.proj1.weight"].shape
        hidden = state["x_embedder.proj2.weight"].shape[0]
        head_dim = state["u_heads.0.attn.q_norm.weight"].shape[0]
        classes = state["y_embedder.weight"].shape[0] - 1
        tokens = state["pos_embed"].shape[0] - sum(state[f"{group}_tokens"].shape[0] for group, _ in PREFIX)
    except KeyError as err:
        raise PretrainedError(f"the pMF weights lack {err.args[0]!r}: the checkpoint is incomplete or of another network") from None
    count = lambda group: len({m.group(1) for key in state if (m := re.match(rf"{group}\.(\d+)\.", key))})  # noqa: E731
    side = round(tokens**0.5)
    return dict(in_channels=int(in_channels), input_size=int(side * patch), num_classes=int(classes), depth=count("shared_blocks") + count("u_heads"),
                hidden=int(hidden), heads=int(hidden // head_dim), patch=int(patch), head_depth=count("u_heads"),
                bottleneck=int(bottleneck), v_head=count("v_heads") > 0)


def shapes_of(net: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our state dict of a pmfDiT tree as meta tensors: the names and shapes, no array read or allocated."""
    meta = lambda tree: {k: meta(v) if isinstance(v, dict) else torch.empty(tuple(v.shape), device="meta") for k, v in tree.items()}  # noqa: E731
    return pmf_state(meta(net))


def official_preset(arch: dict[str, Any]) -> str | None:
    """The preset of these sizes (official depth, width, heads, patch, input size, head depth 8, bottleneck), or None."""
    for name, (depth, hidden, heads, patch, size) in PMF_PRESETS.items():
        if (arch["depth"], arch["hidden"], arch["heads"], arch["patch"], arch["input_size"], arch["head_depth"], arch["bottleneck"],
                arch["in_channels"]) == (depth, hidden, heads, patch, size, 8, 128 if hidden <= 1024 else 256, 3):
            return name
    return None


def pmf_state(net: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A pmfDiT's flax params -> our MiT's state dict (names and layouts)."""
    renamed = {_BLOCK.sub(r"\1.\2.", name).replace(".embedding_table", ""): value for name, value in torch_layout(net).items()}
    return _drop_leading_axis(renamed)


def torch_port_state(payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PyTorch port's state dict (keys ``net.*``) -> our MiT's (its rotary buffer left out)."""
    renamed = rename_official(payload)
    return _drop_leading_axis({k: v for k, v in renamed.items() if k != "rope_freqs"})


def _drop_leading_axis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[0] if _TABLES.match(k) and v.ndim == 3 else v for k, v in state.items()}


def is_torch_port(payload: Any) -> bool:
    """Whether an unpickled object is the PyTorch port's pMF state dict."""
    return isinstance(payload, dict) and "net.x_embedder.proj1.weight" in payload and "net.shared_blocks.0.norm1.weight" in payload


def choose_weights(weights: str, choices: dict[str, tuple[str, ...]], preset: str | None, what: str) -> str:
    """The key of :func:`weight_choices` that ``weights`` asks for ("ema" picks the official EMA or the only one)."""
    emas = [k for k in choices if k.startswith("ema")]
    if weights == "ema" and "ema" not in choices:
        official = f"ema{OFFICIAL_EMA[preset]}" if preset in OFFICIAL_EMA else None
        if official in choices or len(emas) == 1:
            return official if official in choices else emas[0]
        if not emas:
            raise PretrainedError(f"{what} holds no EMA weights (only {', '.join(choices)}); pass weights='model'")
        raise PretrainedError(f"{what} holds the EMAs {', '.join(emas)} and none is the official choice for this size: pass one as weights=")
    if weights not in choices:
        raise PretrainedError(f"{what} has no weights {weights!r}; it holds: {', '.join(choices)} (and 'ema', the official EMA)")
    return weights


def spec_of(arch: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of the MiT for weights of ``arch`` (every size explicit; a size of no preset
    is built through the small preset's constructor with all its sizes given)."""
    kwargs = dict(arch)
    kwargs["noise_scale"] = NOISE_SCALE.get(preset, 1.0)
    return {"name": preset or "pmf-tiny/4", "kwargs": kwargs}


def official_meta(spec: dict[str, Any], step: Any) -> dict[str, Any]:
    """Checkpoint meta (as a run records it) for released pMF weights: class-conditional images in [-1, 1]."""
    kwargs = spec["kwargs"]
    size = kwargs["input_size"]
    return {"format": 1, "source": "official pMF checkpoint", "step": step, "objective": "pmf", "model": spec,
            "data": {"name": "imagenet", "kind": "images", "sample_shape": [kwargs["in_channels"], size, size],
                     "num_classes": kwargs["num_classes"], "info": {}}}


def _detect(source: Source) -> bool:
    if source.is_torch_file:
        return is_torch_port(source.torch_payload)
    return source.flax_checkpoint is not None and is_official_pmf(source.flax_tree)


def _load(source: Source, preset: str | None, weights: str) -> Loaded:
    return _load_torch_port(source, preset, weights) if source.is_torch_file else _load_flax(source, preset, weights)


def _sized(shapes: dict[str, torch.Tensor], preset: str | None, what: str) -> tuple[dict[str, Any], str | None]:
    """(sizes, official preset or None) of weights with these shapes; a ``preset`` they are not is an error."""
    arch = architecture(shapes)
    found = official_preset(arch)
    if preset is not None and preset != found:
        sizes = ", ".join(f"{k} {v}" for k, v in arch.items())
        raise PretrainedError(f"{what} holds {found or 'a pMF MiT of no official size'} ({sizes}), not {preset}"
                              + ("; drop preset= or pass " + found if found else "; drop preset="))
    return arch, found


def _load_flax(source: Source, preset: str | None, weights: str) -> Loaded:
    tree, what = source.flax_tree, str(source.path)
    choices = weight_choices(tree)
    arch, found = _sized(shapes_of(net_tree(_subtree(tree, next(iter(choices.values()))))), preset, what)
    key = choose_weights(weights, choices, found, what)
    path = choices[key]
    state = read_flax_state(source.flax_checkpoint, keep=lambda t: {**{k: t[k] for k in ("step",) if k in t}, path[0]: _nest(t[path[0]], path[1:])})
    spec = spec_of(arch, found)
    model = fill(spec, pmf_state(net_tree(_subtree(state, path))), f"{what} ({'/'.join(path)})")
    step = _step(state.get("step"))
    taken = {"model": "params (raw weights)", "ema": "ema_params (EMA)"}.get(key, f"ema_params[{path[-1]}] (EMA, half-life {path[-1]}k images)")
    return Loaded(model, spec, FORMAT, f"{taken}, step {step}", info={"step": step}, meta=official_meta(spec, step))


def _load_torch_port(source: Source, preset: str | None, weights: str) -> Loaded:
    if weights != "ema":
        raise PretrainedError(f"{source.path} holds one set of weights (the released EMA): use weights='ema'")
    state = torch_port_state(source.torch_payload)
    arch, found = _sized(state, preset, str(source.path))
    spec = spec_of(arch, found)
    model = fill(spec, state, str(source.path))
    return Loaded(model, spec, FORMAT, "the file's only weights (the released EMA)", meta=official_meta(spec, None))


def _nest(node: Any, path: tuple[str, ...]) -> Any:
    """``node`` cut down to the branch along ``path``, keeping the nesting: _nest(t, ("a",)) = {"a": t["a"]}."""
    return node if not path else {path[0]: _nest(node[path[0]], path[1:])}


def _step(value: Any) -> int | None:
    return None if value is None else int(torch.as_tensor(value).reshape(-1)[0])


register_format(Format(FORMAT, "released pMF checkpoints pMF-{B,L,H}-{16,32}[-full].zip (flax Orbax TrainState of pixelMeanFlow) "
                       "and the PyTorch port's pMF-*.pt",
                       _detect, _load), before="flax-meanflow")
