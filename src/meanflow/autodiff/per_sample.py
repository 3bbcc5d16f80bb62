"""Per-sample randomness inside the model: dropout masks that depend on the global sample, not the process.

The loss draws its noise and times for the whole global batch and keeps its shard, so one process
and N processes see the same per-sample randomness. Dropout inside the network is drawn by the
network itself, from the default generator, for the local rows only: the same sample would get a
different mask on one process than on two. :class:`PerSampleDropout` fixes that for any model
that uses ``nn.Dropout`` / ``F.dropout`` / ``F.dropout1d|2d|3d`` (ours and a user's): a torch-function
mode that replaces each dropout mask by one computed, element by element, from

    (a key drawn from the default generator of the tensor's device, global sample index, element)

with a counter-based hash, so the mask of a row depends only on its global index, the step and
the position of the dropout call in the forward pass: whatever the number of processes, the
rows' order in a call (the Dual path puts the r != t rows first), or the split of a batch into
several model calls (the forward-AD path). Each model call made through the JVP layer starts the
default generator from the same per-step seed (:func:`model_rows`), so the l-th dropout of every
forward in a step gets the same key.

Because the key comes from the default generator, code that replays a draw by saving and
restoring the generator state gets the same mask again. The tangent engines draw each dropout's
mask once, on ones, for primal and tangent (:func:`meanflow.autodiff.rules.dropout`). A traced
row pass takes its keys as an input (``keys``), drawn just before the call by :func:`draw_keys`
in the order the eager pass would draw them, so its masks equal the eager pass's.
Activation checkpointing recomputes its blocks in the backward pass, outside this mode,
where a dropout would draw an ordinary mask and the gradients would be wrong: a dropout inside
``torch.utils.checkpoint`` is therefore an error in the forward pass.
Randomness drawn in the model by other means (``torch.rand`` on the default generator,
``alpha_dropout``) is not made per-sample; ``alpha_dropout`` and ``feature_alpha_dropout`` raise.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.overrides import TorchFunctionMode

_ELEMENTWISE = (F.dropout, torch.dropout)
_CHANNELWISE = (F.dropout1d, F.dropout2d, F.dropout3d)
_UNSUPPORTED = (F.alpha_dropout, F.feature_alpha_dropout, torch.alpha_dropout, torch.feature_alpha_dropout)
_MASK32 = 0xFFFFFFFF


class PerSampleDropout(TorchFunctionMode):
    """Dropout masks drawn per global sample (module docstring), for one training step.

    Args:
        seed: the step's dropout seed (training derives it from the run's seed and the step); the default
            generators are seeded with it on entry.
        rows: (B,) int64 global indices of the local batch's rows (rank k of W: k B + arange(B)), on the
            model's device (nothing is then copied between host and device).
        total: the global batch size (rows of a model input that stacks the batch c times get the
            indices ``rows + c * total``).
    """

    def __init__(self, seed: int, rows: Tensor, total: int):
        super().__init__()
        self.seed = seed
        self.base, self.total = rows.long(), int(total)
        self.current = self.base
        self.keys: Iterator[Tensor] | None = None  # keys given in advance (a traced row pass), else drawn
        self.drawn = 0  # keys drawn or taken so far

    def __enter__(self) -> "PerSampleDropout":
        torch.manual_seed(self.seed)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UNSUPPORTED:
            raise NotImplementedError(f"{func.__name__} is not drawn per sample; use dropout, or turn it off for world-size-invariant training")
        if func not in _ELEMENTWISE and func not in _CHANNELWISE:
            return func(*args, **kwargs)
        x, p, training, inplace = dropout_args(args, kwargs)
        if not training or p == 0.0:
            return func(*args, **kwargs)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if inside_checkpoint():
            raise RuntimeError(
                f"{func.__name__} inside activation checkpointing (torch.utils.checkpoint): the block is recomputed in the "
                "backward pass, outside this step's per-sample dropout, so its mask there would differ from the forward "
                "pass's and the gradients would be wrong. Set the model's dropout to 0 in checkpointed blocks, or train "
                "without activation checkpointing."
            )
        tail = x.shape[1:] if func in _ELEMENTWISE else (*x.shape[1:2], *([1] * (x.ndim - 2)))
        key = next(self.keys) if self.keys is not None else _key(x.device)
        self.drawn += 1
        keep = uniform(key, self.row_ids(x.shape[0]).to(x.device), tuple(tail)) >= p  # (B', *tail)
        scale = keep.to(x.dtype) / (1.0 - p) if p < 1.0 else keep.to(x.dtype)
        return x.mul_(scale) if inplace else x * scale

    def row_ids(self, size: int) -> Tensor:
        """(size,) global indices of the rows of a tensor of ``size`` rows in the current model call."""
        n = self.current.numel()
        if size == n:
            return self.current
        if n and size % n == 0:
            return torch.cat([self.current + c * self.total for c in range(size // n)])
        raise RuntimeError(
            f"dropout on a tensor of {size} rows inside a model call on {n} samples: per-sample dropout masks need "
            "the batch as the first dimension (or the batch stacked whole along it); move the batch first, or set dropout to 0"
        )


_ACTIVE: list[PerSampleDropout] = []


@contextlib.contextmanager
def model_rows(index: Tensor | None) -> Iterator[None]:
    """Inside: model calls see the rows ``index`` (n,) of the local batch (None: all, in order).

    Called by the JVP layer around every model call; a no-op unless a :class:`PerSampleDropout` is
    active. Also restarts the default generators from the step's seed, so the l-th dropout call of
    every model call of the step gets the same key.
    """
    if not _ACTIVE:
        yield
        return
    mode = _ACTIVE[-1]
    previous = mode.current
    mode.current = mode.base if index is None else mode.base[index.to(mode.base.device)]
    torch.manual_seed(mode.seed)
    try:
        yield
    finally:
        mode.current = previous


def draw_keys(count: int, device: torch.device) -> Tensor:
    """(count, 2) int64: the keys the next ``count`` dropout calls would draw, drawn now, in the same order."""
    return torch.stack([_key(device) for _ in range(count)]) if count else torch.zeros(0, 2, dtype=torch.long, device=device)


def active() -> PerSampleDropout | None:
    """The innermost active :class:`PerSampleDropout`, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def inside_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint`` (a frame of that module on the Python stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def uniform(key: Tensor, rows: Tensor, tail: tuple[int, ...]) -> Tensor:
    """U[0, 1) values (B, *tail) float32, each a hash of (key (2,) int64, rows[b], element index).

    A pure function of its arguments on any device: the values of a row do not depend on the
    other rows. 24-bit resolution. The row and element indices are hashed on their own (B + J
    values), so the (B, J) values take only one multiply-xorshift-multiply round of their xor, in
    place: about ten passes over B J int64 values (the cost of a dropout mask, drawn in every call).
    """
    count = math.prod(tail)
    row = _mix(rows.long() ^ key[0])  # (B,)
    element = _mix(torch.arange(count, device=rows.device, dtype=torch.long) ^ key[1])  # (J,)
    h = row[:, None] ^ element[None, :]  # (B, J), values below 2^32
    h.mul_(_ROUND[0]).bitwise_and_(_MASK32)
    h.bitwise_xor_(h >> 15)
    h.mul_(_ROUND[1]).bitwise_and_(_MASK32)
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(rows.shape[0], *tail)


# Odd multipliers below 2^31: their products with values below 2^32 stay below 2^63 (no int64 overflow).
_ROUND = (0x7FEB352D, 0x5BD1E995)


def _key(device: torch.device) -> Tensor:
    """(2,) int64 drawn from the default generator of ``device`` (replayable by restoring its state)."""
    return torch.randint(0, _MASK32, (2,), device=device, dtype=torch.long)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors, computed without int64 overflow."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), with intermediates below 2^50."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def dropout_args(args: tuple, kwargs: dict) -> tuple[Tensor, float, bool, bool]:
    """(input, p, training, inplace) of a call to F.dropout / torch.dropout / F.dropoutNd."""
    names = ("input", "p", "training", "inplace")
    values = dict(zip(names, args))
    values.update({("training" if k == "train" else k): v for k, v in kwargs.items()})
    return values["input"], float(values.get("p", 0.5)), bool(values.get("training", True)), bool(values.get("inplace", False))


__all__ = ["PerSampleDropout", "active", "draw_keys", "dropout_args", "inside_checkpoint", "model_rows", "uniform"]
