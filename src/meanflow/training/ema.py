"""Exponential moving averages of the parameters, several decays at once."""
from __future__ import annotations

import torch
from torch import nn

from ..runtime.distributed import local, shard_like


class EMA:
    """Shadow copies ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` for each decay.

    Buffers (none in our models, but allowed) are copied, not averaged. The shadows have the
    parameters' layout: DTensors with the same shards when the model is sharded (FSDP2), each rank
    updating its own shard; :meth:`state_dict` returns them as they are (gather with
    :func:`meanflow.runtime.distributed.full_tensor`), :meth:`load_state_dict` takes full tensors.
    """

    def __init__(self, model: nn.Module, decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.shadows = [{k: v.detach().clone().float() for k, v in model.state_dict().items()} for _ in self.decays]

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """One EMA step from ``model``; ``applied`` (0-d bool on the device, None = True) masks it on the
        device: where False every shadow stays bit-identical, without a host read."""
        params = dict(model.named_parameters())
        for decay, shadow in zip(self.decays, self.shadows):
            weight = 1.0 - decay if applied is None else applied.float() * (1.0 - decay)
            for name, value in model.state_dict().items():
                mine, value = local(shadow[name]), local(value)
                if name in params:
                    mine.lerp_(value.float(), weight)
                elif applied is None:
                    mine.copy_(value)
                else:
                    mine.copy_(torch.where(applied, value.to(mine.dtype), mine))

    def state_dict(self, index: int = 0) -> dict[str, torch.Tensor]:
        return self.shadows[index]

    def load_state_dict(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Replace shadow ``index`` by the full tensors ``state``, laid out like the current shadows."""
        missing = set(self.shadows[index]) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (differing keys: {sorted(missing)[:5]})")
        self.shadows[index] = {k: shard_like(v.float().clone(), self.shadows[index][k]) for k, v in state.items()}

    @staticmethod
    def file_name(index: int, decay: float) -> str:
        """``ema.safetensors`` for the first decay, ``ema_<decay>.safetensors`` for the others."""
        return "ema.safetensors" if index == 0 else f"ema_{decay:g}.safetensors"
