"""The one interface the trainer, samplers and metrics use for data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

KINDS = ("points", "images", "latents")


class Dataset(Protocol):
    """A finite data set addressed by integer indices.

    ``get(index)`` returns ``(x, labels)``: x float32 of shape (len(index), *sample_shape), already
    normalised (points as given, images in [-1, 1], latents multiplied by their scale factor), and
    labels int64 of shape (len(index),) or None. ``kind`` is one of ``KINDS``; ``info`` holds
    metadata that must travel with a checkpoint (e.g. the latent scale factor and VAE name).
    """

    kind: str
    num_classes: int
    sample_shape: tuple[int, ...]
    info: dict

    def __len__(self) -> int: ...

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def without_labels(self) -> "Dataset": ...


@dataclass
class TensorDataset:
    """In-memory data set. ``x``: (N, ...) float32 or uint8 images (mapped to [-1, 1] on access)."""

    x: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int = 0
    kind: str = "points"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, got {self.kind!r}")
        if self.x.shape[0] == 0:
            raise ValueError("data set is empty")
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            raise ValueError(f"labels must have shape ({self.x.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def without_labels(self) -> "TensorDataset":
        """The same data as an unconditional data set (labels None, num_classes 0)."""
        return TensorDataset(self.x, None, num_classes=0, kind=self.kind, info=self.info)

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.x[index]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        return x, None if self.labels is None else self.labels[index]
