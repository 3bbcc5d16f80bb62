"""Dual numbers over the leading rows of a batch: the MeanFlow JVP inside the forward pass.

The MeanFlow target needs du/dt = J_u . (v, 0, 1) for the r != t rows of a batch only. Our
models compute it during their ordinary forward pass over the whole batch, on :class:`Dual`
values: the primal (B, ...) is exactly the plain forward's, recorded by autograd as usual, and
beside it the tangent of its first n rows (n, ...) is propagated under ``torch.no_grad()``
(du/dt is a stop-gradient target, so nothing of it is saved for backward). The cost over a
Flow Matching step is one tangent pass over n rows. The tangent rules (linear, conv, norms,
activations, products, dropout, attention) are those of :mod:`meanflow.autodiff.rules`, which the
row tangent uses too; here are the few that only Dual values need: sums, concatenation, views
(the same op on the tangent), the rotary embedding (a linear map) and SwiGLU (a product).

The batch dimension stays first: ops that would move, split or index it raise. A model opts in
by setting ``supports_dual = True`` and building from the layers at the end of this module
(drop-in subclasses of ``nn.Linear`` and friends, with the same parameters) and the functions
here, which pass plain tensors straight to the ordinary ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rules

@dataclass(init=False, repr=False, eq=False)
class Dual:
    """Primal values (B, ...) and the tangent (n, ...) of their first n rows, n <= B.

    The primal may require gradients; the tangent never does. Declared a dataclass so that
    wrappers which find a call's tensors by walking its inputs and outputs (FSDP2's hooks that
    reduce-scatter the gradients after backward) see the tensors inside.
    """

    __slots__ = ("primal", "tangent")
    primal: Tensor
    tangent: Tensor

    def __init__(self, primal: Tensor, tangent: Tensor):
        if tangent.shape[1:] != primal.shape[1:] or tangent.shape[0] > primal.shape[0]:
            raise ValueError(
                f"a Dual's tangent covers leading rows of its primal: got primal {tuple(primal.shape)}, tangent {tuple(tangent.shape)}"
            )
        self.primal, self.tangent = primal, tangent

    @property
    def shape(self) -> torch.Size:
        return self.primal.shape

    @property
    def ndim(self) -> int:
        return self.primal.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.primal.dtype

    @property
    def device(self) -> torch.device:
        return self.primal.device

    @property
    def rows(self) -> int:
        """n, the number of leading rows that carry a tangent."""
        return self.tangent.shape[0]

    def head(self) -> Tensor:
        """The primal's first n rows, detached: (n, ...)."""
        return self.primal[: self.rows].detach()

    def __repr__(self) -> str:
        return f"Dual(primal={tuple(self.primal.shape)}, tangent rows={self.rows}, dtype={self.dtype})"

    # Arithmetic -----------------------------------------------------------------------------
    def __add__(self, other: Operand) -> "Dual":
        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other: Operand) -> "Dual":
        return add(self, other, alpha=-1.0)

    def __rsub__(self, other: Operand) -> "Dual":
        return add(other, self, alpha=-1.0)

    def __neg__(self) -> "Dual":
        return Dual(-self.primal, -self.tangent)

    def __mul__(self, other: Operand) -> "Dual":
        return mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Tensor | float) -> "Dual":
        if isinstance(other, Dual):
            raise TypeError("division by a Dual is not supported")
        return mul(self, 1.0 / other)

    # Shape ops: applied alike to primal and tangent, the batch dimension untouched ------------
    def __getitem__(self, index) -> "Dual":
        index = index if isinstance(index, tuple) else (index,)
        if not index or index[0] != slice(None):
            raise IndexError(f"indexing a Dual must keep the batch dimension whole (start with ':'), got {index}")
        return self.map(lambda x: x[index])

    def reshape(self, *shape: int) -> "Dual":
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if shape[0] != self.shape[0]:
            raise ValueError(f"reshaping a Dual must keep the batch dimension {self.shape[0]} first, got {shape}")
        return Dual(self.primal.reshape(shape), self.tangent.reshape(self.rows, *shape[1:]))

    def permute(self, *dims: int) -> "Dual":
        if dims[0] % self.ndim != 0:
            raise ValueError(f"permuting a Dual must keep the batch dimension first, got {dims}")
        return self.map(lambda x: x.permute(*dims))

    def transpose(self, dim0: int, dim1: int) -> "Dual":
        self._check_not_batch(dim0, dim1)
        return self.map(lambda x: x.transpose(dim0, dim1))

    def flatten(self, start_dim: int = 1, end_dim: int = -1) -> "Dual":
        self._check_not_batch(start_dim)
        return self.map(lambda x: x.flatten(start_dim, end_dim))

    def chunk(self, chunks: int, dim: int) -> tuple["Dual", ...]:
        self._check_not_batch(dim)
        return tuple(Dual(p, t) for p, t in zip(self.primal.chunk(chunks, dim), self.tangent.chunk(chunks, dim)))

    def unbind(self, dim: int) -> tuple["Dual", ...]:
        self._check_not_batch(dim)
        return tuple(Dual(p, t) for p, t in zip(self.primal.unbind(dim), self.tangent.unbind(dim)))

    def to(self, *args, **kwargs) -> "Dual":
        return self.map(lambda x: x.to(*args, **kwargs))

    def contiguous(self) -> "Dual":
        return self.map(Tensor.contiguous)

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Dual":
        """Apply a linear, row-wise op (a view, a pooling, a cast) to primal and tangent alike."""
        return Dual(fn(self.primal), fn(self.tangent))

    def _check_not_batch(self, *dims: int) -> None:
        if any(d % self.ndim == 0 for d in dims):
            raise ValueError(f"this op would act on a Dual's batch dimension (dims {dims}); keep dimension 0 as the batch")


Operand = Tensor | Dual | float


def primal(x: Tensor | Dual) -> Tensor:
    """The primal value of a Dual, or x itself."""
    return x.primal if isinstance(x, Dual) else x


def _rows(x: Tensor | float, n: int, ndim: int) -> Tensor | float:
    """The part of a plain operand that meets the first n rows of a batch-first result of ``ndim`` dims.

    An operand with fewer dimensions, or a leading size of 1, broadcasts over the batch and is
    used whole; one with the result's rank is per sample, and its first n rows are used.
    """
    if not isinstance(x, Tensor):
        return x
    if x.ndim > ndim:
        raise ValueError(f"a plain operand of rank {x.ndim} would move a Dual's batch dimension (rank {ndim})")
    return x[:n].detach() if x.ndim == ndim and x.shape[0] != 1 else x.detach()


def _check_operands(out: Tensor, *operands: Operand) -> int:
    """Rows n shared by the Dual operands; raises if broadcasting would shift their batch dimension."""
    n = None
    for a in operands:
        if not isinstance(a, Dual):
            continue
        if a.primal.ndim != out.ndim:
            raise ValueError(f"broadcasting a Dual of rank {a.primal.ndim} against rank {out.ndim} would move its batch dimension")
        if n is not None and a.rows != n:
            raise ValueError(f"Dual operands carry tangents for different numbers of rows: {n} and {a.rows}")
        n = a.rows
    return n


def add(a: Operand, b: Operand, alpha: float = 1.0) -> Dual:
    """a + alpha * b where a or b is a Dual."""
    out = primal(a) + alpha * primal(b) if alpha != 1.0 else primal(a) + primal(b)
    n = _check_operands(out, a, b)
    with torch.no_grad():
        da = a.tangent if isinstance(a, Dual) else None
        db = b.tangent if isinstance(b, Dual) else None
        if db is None:
            tangent = da
        elif da is None:
            tangent = alpha * db
        else:
            tangent = da + alpha * db
        tangent = tangent.expand(n, *out.shape[1:])
    return Dual(out, tangent)


def mul(a: Operand, b: Operand) -> Dual:
    """a * b where a or b is a Dual: tangent da b + a db."""
    out = primal(a) * primal(b)
    n = _check_operands(out, a, b)
    tangent = rules.product(_tangent(a), _rows(primal(b), n, out.ndim), _rows(primal(a), n, out.ndim), _tangent(b))
    return Dual(out, tangent.expand(n, *out.shape[1:]))


def addcmul(c: Operand, a: Operand, b: Operand) -> Tensor | Dual:
    """c + a * b in one kernel (``torch.addcmul``); tangent dc + da b + a db in at most two."""
    if not any(isinstance(x, Dual) for x in (c, a, b)):
        return torch.addcmul(c, a, b)
    out = torch.addcmul(primal(c), primal(a), primal(b))
    n = _check_operands(out, c, a, b)
    tangent = rules.addcmul(_tangent(c), _tangent(a), _rows(primal(b), n, out.ndim), _rows(primal(a), n, out.ndim), _tangent(b))
    return Dual(out, tangent.expand(n, *out.shape[1:]))


def _tangent(x: Operand) -> Tensor | None:
    """A Dual's tangent, or None for a plain operand."""
    return x.tangent if isinstance(x, Dual) else None


def cat(items: Sequence[Tensor | Dual], dim: int) -> Tensor | Dual:
    """torch.cat along a non-batch dimension; plain members get a zero tangent."""
    if not any(isinstance(x, Dual) for x in items):
        return torch.cat(list(items), dim)
    out = torch.cat([primal(x) for x in items], dim)
    n = _check_operands(out, *items)
    if dim % out.ndim == 0:
        raise ValueError("concatenating Duals along the batch dimension is not supported")
    with torch.no_grad():
        tangents = [x.tangent if isinstance(x, Dual) else x.new_zeros(n, *x.shape[1:]) for x in items]
        return Dual(out, torch.cat(tangents, dim))


# Layers' functional forms: the primal op, and the tangent from :mod:`meanflow.autodiff.rules` ----------
def _call(fn: Callable[..., Tensor], *args: Any) -> Any:
    """A rule's primal call, as the model makes it."""
    return fn(*args)


def _head(n: int) -> Callable[[Tensor], Tensor]:
    """A batch tensor's first n rows, detached: how a rule cuts the primal's results to the rows with a tangent."""
    return lambda x: x[:n].detach()


def linear(x: Tensor | Dual, weight: Tensor, bias: Tensor | None = None) -> Tensor | Dual:
    """F.linear; tangent W dx."""
    if not isinstance(x, Dual):
        return F.linear(x, weight, bias)
    return Dual(F.linear(x.primal, weight, bias), rules.without_bias(F.linear, x.tangent, weight))


def conv2d(x: Tensor | Dual, weight: Tensor, bias: Tensor | None = None, **options) -> Tensor | Dual:
    """F.conv2d (options: stride, padding, dilation, groups); tangent W * dx."""
    if not isinstance(x, Dual):
        return F.conv2d(x, weight, bias, **options)
    return Dual(F.conv2d(x.primal, weight, bias, **options), rules.without_bias(F.conv2d, x.tangent, weight, **options))


def layer_norm(
    x: Tensor | Dual, shape: Sequence[int], weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor | Dual:
    """F.layer_norm over the trailing ``shape``; tangent via the (symmetric) normalisation Jacobian."""
    if not isinstance(x, Dual):
        return F.layer_norm(x, shape, weight, bias, eps)
    return Dual(*rules.layer_norm(_call, _head(x.rows), x.primal, x.tangent, list(shape), weight, bias, eps))


def group_norm(x: Tensor | Dual, groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor | Dual:
    """F.group_norm of (B, C, ...) input; tangent via the (symmetric) normalisation Jacobian."""
    if not isinstance(x, Dual):
        return F.group_norm(x, groups, weight, bias, eps)
    return Dual(*rules.group_norm(_call, _head(x.rows), x.primal, x.tangent, groups, weight, bias, eps))


def gelu(x: Tensor | Dual, approximate: str = "none") -> Tensor | Dual:
    """F.gelu; tangent gelu'(x) dx."""
    if not isinstance(x, Dual):
        return F.gelu(x, approximate=approximate)
    return Dual(F.gelu(x.primal, approximate=approximate), rules.activation("gelu", x.tangent, x.head(), approximate=approximate))


def silu(x: Tensor | Dual) -> Tensor | Dual:
    """F.silu; tangent silu'(x) dx."""
    if not isinstance(x, Dual):
        return F.silu(x)
    return Dual(F.silu(x.primal), rules.activation("silu", x.tangent, x.head()))


def dropout(x: Tensor | Dual, p: float, training: bool) -> Tensor | Dual:
    """F.dropout; a Dual's tangent rows get the same mask as their primal rows (:func:`rules.dropout`)."""
    if not isinstance(x, Dual):
        return F.dropout(x, p, training)
    if not training or p == 0.0:
        return x
    return Dual(*rules.dropout(_call, _head(x.rows), lambda ones: F.dropout(ones, p, True), x.primal, x.tangent))


def rms_norm(x: Tensor | Dual, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor | Dual:
    """x / sqrt(mean(x^2) + eps) over the last dimension, times ``weight``; the plain formula of the
    iMF code (forward-mode AD goes through it too). Tangent: :func:`rules.rms_norm`."""
    def plain(a: Tensor) -> Tensor:
        out = a * torch.rsqrt(a.square().mean(-1, keepdim=True) + eps)
        return out if weight is None else out * weight

    if not isinstance(x, Dual):
        return plain(x)
    return Dual(plain(x.primal), rules.rms_norm(x.head(), x.tangent, (-1,), eps, weight))


def rotary(x: Tensor | Dual, cos: Tensor, sin: Tensor) -> Tensor | Dual:
    """Rotary position embedding of adjacent channel pairs (x[2i], x[2i + 1]) by the angles of each token.

    x: (B, N, heads, d); cos, sin: (N, d / 2). Pair i of token n becomes
    (a cos - b sin, a sin + b cos). The map is linear in x, so the tangent is the same rotation of dx.
    """
    def rotate(a: Tensor) -> Tensor:
        pairs = a.unflatten(-1, (-1, 2))  # (B, N, heads, d/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, None], sin[:, None]  # (N, 1, d/2)
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)  # (B, N, heads, d)

    if not isinstance(x, Dual):
        return rotate(x)
    with torch.no_grad():
        tangent = rotate(x.tangent)
    return Dual(rotate(x.primal), tangent)


def swiglu(gate: Tensor | Dual, value: Tensor | Dual) -> Tensor | Dual:
    """silu(gate) * value (the SwiGLU MLP's gating); tangent silu'(gate) d gate * value + silu(gate) d value."""
    if not isinstance(gate, Dual) and not isinstance(value, Dual):
        return F.silu(gate) * value
    return mul(silu(gate), value)


# Drop-in layers -------------------------------------------------------------------------------
class Linear(nn.Linear):
    """``nn.Linear`` that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding) that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GELU(nn.GELU):
    """``nn.GELU`` that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return gelu(x, self.approximate)


class SiLU(nn.SiLU):
    """``nn.SiLU`` that also takes a :class:`Dual`."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return silu(x)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel scale (initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return rms_norm(x, self.weight, self.eps)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that also takes a :class:`Dual` (one mask for primal and tangent)."""

    def forward(self, x: Tensor | Dual) -> Tensor | Dual:
        return dropout(x, self.p, self.training)


def supports_dual(model: nn.Module) -> bool:
    """Whether ``model(Dual z, r, Dual t, labels)`` returns a Dual (our model families do)."""
    return bool(getattr(getattr(model, "module", model), "supports_dual", False))
