"""Randomness as a pure function of (seed, step, stream), and the global data order.

Every random draw of a training step comes from a generator seeded by ``derive_seed(seed, step,
stream)``; the loss draws the whole *global* batch and keeps its shard. Nothing depends on the
rank or the number of processes, and a resumed run needs no saved RNG state to continue exactly.
"""
from __future__ import annotations

import hashlib

import torch

STREAMS = {"loss": 0, "augment": 1, "dropout": 2, "data": 3, "sample": 4, "edm_augment": 5, "labels": 6}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, machines and Python versions."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator for one (seed, step, stream) triple on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, STREAMS[stream]))
    return gen


def rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The global torch RNG states: ``rng_cpu`` (uint8 tensor) and ``rng_cuda`` (one per visible GPU, or [])."""
    return {"rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(saved: dict) -> None:
    """Put back what :func:`rng_states` returned. CUDA states are restored for the GPUs visible now
    (the first ``min(saved, visible)``); a checkpoint from a CPU run restores the CPU state only."""
    torch.set_rng_state(saved["rng_cpu"])
    cuda = saved.get("rng_cuda") or []
    if cuda and torch.cuda.is_available():
        for index, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


class GlobalBatchOrder:
    """Indices of the global batch of every step: a fresh seeded permutation per epoch, last partial
    batch dropped. Rank k of W takes the k-th of W equal slices, so the union over ranks is the
    same global batch whatever W is.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int):
        if global_batch > num_items:
            raise ValueError(f"global batch size {global_batch} exceeds the data set size {num_items} (the training split, "
                             f"after any held-out part); set train.batch_size to at most {num_items}, or bring more data")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.steps_per_epoch = num_items // global_batch
        self._epoch, self._perm = -1, None

    def global_indices(self, step: int) -> torch.Tensor:
        """(global_batch,) int64 indices of the step's global batch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, STREAMS["data"]))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=gen)
        return self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]

    def local_indices(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """(global_batch // world_size,) indices of this rank's shard."""
        local = self.global_batch // world_size
        return self.global_indices(step)[rank * local:(rank + 1) * local]
