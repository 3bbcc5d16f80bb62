"""Check a state dict against a network before loading it: all or nothing, with the problems named."""
from __future__ import annotations

from collections.abc import Mapping

import torch


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
