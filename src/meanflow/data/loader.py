"""Step batches through a torch ``DataLoader``: worker processes read, decode and normalise
(``Dataset.get``) the batches of the coming steps while the model trains, into pinned memory for
a fast copy to the GPU.

Item i of the loader is this rank's whole batch of step ``start + i``, with the indices of the
seeded global order (:class:`~meanflow.runtime.seeding.GlobalBatchOrder`), and the loader keeps
item order whatever the number of workers: the batches, and so the run, are the same for any
``train.num_workers``, and a resumed run starts at its step with no data state to restore.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..runtime.seeding import GlobalBatchOrder
from .base import Dataset


class StepBatches(torch.utils.data.Dataset):
    """Map-style view: item i = this rank's slice of the global batch of step start + i = (x (b, ...), labels (b,) or None)."""

    def __init__(self, data: Dataset, order: GlobalBatchOrder, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.data, self.order, self.start, self.stop = data, order, start, stop
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The data set is asked for the whole global batch and this rank keeps its slice, so randomness
        inside the data set (the VAE posterior draws of latents) is the same for any number of processes."""
        x, labels = self.data.get(self.order.global_indices(self.start + i))
        size = self.order.global_batch // self.world_size
        local = slice(self.rank * size, (self.rank + 1) * size)
        return x[local], None if labels is None else labels[local]


def step_batches(data: Dataset, order: GlobalBatchOrder, start: int, stop: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """This rank's (x, labels) of steps ``start`` .. ``stop - 1``, in order.

    ``num_workers`` = 0 reads in this process; > 0 prefetches two batches per worker.
    ``pin_memory``: page-locked CPU tensors (use when training on a GPU).
    """
    batches = StepBatches(data, order, start, stop, rank, world_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)
    return iter(loader)


__all__ = ["StepBatches", "step_batches"]
