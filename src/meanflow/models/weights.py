"""Fill a network from a state dict: all or nothing, with the problems named (the one fill step every
reader uses: runs, released weights, ``train --init``, resuming, EMA copies)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn


class PretrainedError(ValueError):
    """A checkpoint could not be read or does not fit the network; the message says why and what to do."""


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], shown: int = 10) -> list[str]:
    """What keeps ``state`` from loading into a network whose ``state_dict()`` is ``expected``; [] if nothing.

    One entry per kind of problem, each naming up to ``shown`` keys: ``missing keys: a, b ...``,
    ``unexpected keys: c``, ``wrong shapes: k: file (7,), model (32,); ...``.
    """
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in sorted(expected.items()) if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for what, items, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "), ("wrong shapes", shapes, "; ")):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > shown else ""
            problems.append(f"{what}: {sep.join(items[:shown])}{more}")
    return problems


def fill_model(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, fix: str = "", *, target: str | None = None,
               spare: Mapping[str, torch.Tensor] | None = None, shown: int = 3,
               load: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None) -> nn.Module:
    """``model`` with every tensor of its state dict taken from ``state`` (cast to the model's dtypes); returns it.

    All or nothing: a missing, unexpected or misshaped key raises :class:`PretrainedError`
    "``what`` does not fit ``target`` (problems); ``fix``" and nothing is loaded. ``spare``: keys the
    file may hold besides the model's, each checked against the given shape and then left out (e.g.
    an unreleased head's layer). ``load(model, state)``: how the checked state goes in (default
    ``load_state_dict``; a sharded model loads full tensors into its shards).
    """
    own = model.state_dict()
    problems = state_mismatch({**own, **(spare or {})}, state, shown=shown)
    if problems:
        raise PretrainedError(f"{what} does not fit {target or type(model).__name__} ({' | '.join(problems)})"
                              + (f"; {fix}" if fix else ""))
    checked = {k: state[k].to(own[k].dtype) for k in own}
    if load is None:
        model.load_state_dict(checked, strict=True)
    else:
        load(model, checked)
    return model
