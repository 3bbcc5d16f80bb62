"""Muon on the weight matrices, Nesterov AdamW on everything else: the optimizer of the pMF recipe (``train.optimizer=muon``).

The official pMF code trains with ``optax.contrib.muon(learning_rate, adam_b2=0.95)``: Muon
(momentum 0.95, Nesterov, five quintic Newton-Schulz steps that orthogonalise the update, step
scaled by sqrt(max(1, fan_out / fan_in))) on every 2-D parameter, which in its Flax network are
exactly the dense layers' kernels, and optax's AdamW with Nesterov momentum (b1 0.9, b2 0.95,
eps 1e-8, no weight decay) on the rest (convolutions, embeddings, tokens, norms, biases), both at
the same learning rate. Here the Muon part is PyTorch's ``torch.optim.Muon`` on the weights of the
model's ``nn.Linear`` layers (the same split: a torch ``nn.Embedding`` table is 2-D but a Flax
embedding is not a dense kernel, so it stays out) and the rest is :class:`NesterovAdamW`, optax's
Nesterov form, which PyTorch's optimizers do not have (``torch.optim.NAdam`` uses Dozat's momentum
schedule instead).

Two differences from optax that do not change the Muon update's direction: torch's momentum is the
exponential average without optax's bias correction (a scalar that the Newton-Schulz
normalisation removes), and its Newton-Schulz iteration runs in bfloat16 (optax's in the
parameters' dtype). A step the non-finite guard skips (:mod:`meanflow.training.guard`) leaves
every weight and moment bit-identical: the Muon part is restored on the device where
``found_inf`` is set, the Nesterov AdamW part skips itself.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

NS_EPS = 1e-8  # optax.contrib.muon's eps of the Newton-Schulz normalisation


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the ``nn.Linear`` weights, every other trainable parameter), each once, in the model's order."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in linear], [p for p in params if id(p) not in linear]


class NesterovAdamW(torch.optim.Optimizer):
    """optax's ``adamw(..., nesterov=True)`` (the non-matrix part of ``optax.contrib.muon``). Per step k = 1, 2, ...:

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        m_hat = b1 m / (1 - b1^(k+1)) + (1 - b1) g / (1 - b1^k),   v_hat = v / (1 - b2^k)
        p = p - lr (m_hat / (sqrt(v_hat) + eps) + weight_decay p)

    Set ``found_inf`` (0-d float on the device) before :meth:`step` to skip the step where it is 1.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        # capturable: the step count lives on the parameters' device (also after load_state_dict), no host sync
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, capturable=True))

    @torch.no_grad()
    def step(self) -> None:
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            (b1, b2), lr, eps, decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                skip = None if found_inf is None else found_inf.bool()
                self._update(p, p.grad, state, b1, b2, lr, eps, decay, skip)

    @staticmethod
    def _update(p, g, state, b1, b2, lr, eps, decay, skip) -> None:
        """One step of ``p`` from its gradient ``g``; where ``skip`` (0-d bool or None) is True nothing changes."""
        k = state["step"] + 1
        m = b1 * state["exp_avg"] + (1 - b1) * g
        v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
        m_hat = b1 * m / (1 - b1 ** (k + 1)) + (1 - b1) * g / (1 - b1**k)
        new = p - lr * (m_hat / ((v / (1 - b2**k)).sqrt() + eps) + decay * p)
        pick = (lambda old, fresh: fresh) if skip is None else (lambda old, fresh: torch.where(skip, old, fresh))  # noqa: E731
        state["step"].copy_(pick(state["step"], k))
        state["exp_avg"].copy_(pick(state["exp_avg"], m))
        state["exp_avg_sq"].copy_(pick(state["exp_avg_sq"], v))
        p.copy_(pick(p, new))


class MuonAdamW:
    """One optimizer to the trainer: ``torch.optim.Muon`` on the Linear weights, :class:`NesterovAdamW` on the rest.

    ``param_groups`` lists the Nesterov AdamW groups, then Muon's (the trainer sets ``lr`` on each); the state
    dict has the layout of one optimizer over that order of parameters. Set ``found_inf`` (0-d
    float on the device) before :meth:`step` to skip the step where it is 1 (module docstring).
    """

    _step_supports_amp_scaling = True  # the trainer's guard may skip a step on the device

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                 momentum: float = 0.95, ns_steps: int = 5, adjust_lr: str = "original"):
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"train.optimizer=muon needs torch.optim.Muon (PyTorch 2.9 or later); this is torch {torch.__version__}")
        matrices, others = muon_parameters(model)
        if not matrices:
            raise ValueError(f"train.optimizer=muon needs nn.Linear layers; {type(model).__name__} has none (use adam or adamw)")
        self.adam = NesterovAdamW(others, lr=lr, betas=betas, weight_decay=weight_decay) if others else None
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                     eps=NS_EPS, ns_steps=ns_steps, adjust_lr_fn=adjust_lr)
        self.found_inf: torch.Tensor | None = None

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.adam, self.muon) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """One step of both parts; where ``found_inf`` is 1 nothing changes."""
        if self.adam is not None:
            self.adam.found_inf = self.found_inf
            self.adam.step()
        if self.found_inf is None:
            self.muon.step()
            return
        params = [p for group in self.muon.param_groups for p in group["params"] if p.grad is not None]
        before = [(p.clone(), self._buffer(p)) for p in params]
        self.muon.step()
        skip = self.found_inf.bool()
        for p, (weight, buffer) in zip(params, before):
            p.copy_(torch.where(skip, weight, p))
            state = self.muon.state[p]
            state["momentum_buffer"].copy_(torch.where(skip, buffer, state["momentum_buffer"]))

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """A copy of p's Muon momentum (zeros before its first step)."""
        buffer = self.muon.state[p].get("momentum_buffer")
        return torch.zeros_like(p) if buffer is None else buffer.clone()

    def state_dict(self) -> dict[str, Any]:
        """The parts' states as one optimizer's: parameters numbered through the Nesterov AdamW groups, then Muon's."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            saved = part.state_dict()
            state.update({offset + i: values for i, values in saved["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in saved["param_groups"]]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (split back into the parts by their group counts)."""
        groups, offset = list(saved["param_groups"]), 0
        for part in self.parts:
            mine, groups = groups[:len(part.param_groups)], groups[len(part.param_groups):]
            count = sum(len(g["params"]) for g in mine)
            part.load_state_dict({
                "state": {i - offset: v for i, v in saved["state"].items() if offset <= i < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
            })
            offset += count
