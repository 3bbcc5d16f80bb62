"""The tangent rules, written once for both engines: the Dual layers and the row tangent.

Each rule gives the tangent (n, ...) of an op's output for the n rows that carry one, from those
rows' primal values and tangents. :mod:`meanflow.autodiff.dual` calls them on :class:`Dual`
values, :mod:`meanflow.autodiff.row_rules` from the row tangent's dispatch, and
:mod:`meanflow.models.attention` for its attention kernels. With x the rows of an input and dx
their tangent:

    linear, conv                op(dx) without the bias                             :func:`without_bias`
    layer / group norm          the normalisation's backward kernel on dx (its Jacobian is symmetric),
                                then the affine scale; statistics from the primal's kernel   :func:`layer_norm`, :func:`group_norm`
    RMS norm                    rstd (dx - x_hat mean(x_hat dx)) w, x_hat = x rstd             :func:`rms_norm`
    GELU, SiLU, ReLU, tanh, ... f'(x) dx through the backward kernels (diagonal Jacobians)   :data:`ACTIVATIONS`
    softmax                     p (dx - sum(p dx)) through softmax's backward kernel        :func:`softmax`
    attention softmax(s) v      ds = (dq k^T + q dk^T) scale, dp = softmax'(ds), dp v + p dv  :func:`attention`
    a b, c + a b                da b + a db, dc + da b + a db                            :func:`product`
    dropout                     one mask, drawn on ones, scales primal and tangent        :func:`dropout`

Rules that need the primal's own results (a normalisation's statistics, dropout's mask) run the
primal too and return ``(out, tangent)``; they take ``run(fn, *args)``, which calls the primal op
as the engine's user would (with gradients where the user has them), and ``rows(x)``, which cuts
a batch tensor (the input, or a result of the primal call) to the rows that carry a tangent,
outside autograd. Tangents are computed with gradients off.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten
Run = Callable[..., Any]
Rows = Callable[[Tensor], Tensor]


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in ``dtype`` (x itself when it has it: no call into torch)."""
    return x if x.dtype == dtype else x.to(dtype)


def covers(total: Tensor, *terms: Tensor) -> bool:
    """Whether every term broadcasts to total's shape (so total can take them in place)."""
    return all(t.ndim <= total.ndim and all(b in (1, a) for a, b in zip(total.shape[::-1], t.shape[::-1])) for t in terms)


def accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    """total + term, in place when total is a fresh tensor of the sum's shape (None: term)."""
    if total is None:
        return term
    return total.add_(term) if covers(total, term) else total + term


@torch.no_grad()
def without_bias(op: Callable[..., Tensor], dx: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Tangent of a linear layer or convolution ``op(x, weight, bias, *args, **kwargs)``: op(dx, W) without the bias."""
    return op(dx, weight, None, *args, **kwargs)


@torch.no_grad()
def product(da: Tensor | None, b: Tensor | float, a: Tensor | float, db: Tensor | None, value: float = 1) -> Tensor:
    """Tangent of ``value a b``: value (da b + a db); a None tangent is zero, a and b are the rows' operands."""
    if da is None:
        return db * a * value if value != 1 else db * a
    out = da * b * value if value != 1 else da * b
    if db is None:
        return out
    return out.addcmul_(a, db, value=value) if covers(out, a, db) else out + a * db * value


@torch.no_grad()
def addcmul(dc: Tensor | None, da: Tensor | None, b: Tensor | float, a: Tensor | float, db: Tensor | None,
            value: float = 1) -> Tensor:
    """Tangent of ``c + value a b``: dc + value (da b + a db), accumulated in place where the shapes allow."""
    if dc is None:
        return product(da, b, a, db, value)
    fresh = False  # dc is the caller's until the first sum; then sums go in place where the shapes allow
    for x, y in ((da, b), (db, a)):
        if x is not None:
            dc = dc.addcmul_(x, y, value=value) if fresh and covers(dc, x, y) else torch.addcmul(dc, x, y, value=value)
            fresh = True
    return dc


def layer_norm(run: Run, rows: Rows, x: Tensor, dx: Tensor, shape: list[int], weight: Tensor | None,
               bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """F.layer_norm over the trailing ``shape``: the output (B, ...) and its rows' tangent (n, ...).

    The primal goes through ``torch.native_layer_norm`` (F.layer_norm's kernel, which also gives
    mean and 1 / std); under autocast, whose dtype policy that call would bypass, through
    F.layer_norm, and the rows' statistics come from the kernel again.
    """
    if torch.is_autocast_enabled(x.device.type):
        out = run(F.layer_norm, x, shape, weight, bias, eps)
        head = rows(x).to(out.dtype)
        _, mean, rstd = torch.native_layer_norm(head, shape, None, None, eps)
    else:
        out, mean, rstd = run(torch.native_layer_norm, x, shape, weight, bias, eps)
        head, mean, rstd = rows(x), rows(mean), rows(rstd)
    with torch.no_grad():
        tangent = aten.native_layer_norm_backward(cast(dx, head.dtype), head, shape, mean, rstd, None, None,
                                                  [True, False, False])[0]
        return out, tangent if weight is None else tangent.mul_(weight)


def group_norm(run: Run, rows: Rows, x: Tensor, dx: Tensor, groups: int, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """F.group_norm of (B, C, ...) input: the output and its rows' tangent; as :func:`layer_norm`."""
    channels, spatial = x.shape[1], math.prod(x.shape[2:])
    if torch.is_autocast_enabled(x.device.type) or not x.is_contiguous():
        out = run(F.group_norm, x, groups, weight, bias, eps)
        head = rows(x).to(out.dtype).contiguous()
        _, mean, rstd = torch.native_group_norm(head, None, None, head.shape[0], channels, spatial, groups, eps)
    else:
        out, mean, rstd = run(torch.native_group_norm, x, weight, bias, x.shape[0], channels, spatial, groups, eps)
        head, mean, rstd = rows(x), rows(mean), rows(rstd)
    with torch.no_grad():
        tangent = aten.native_group_norm_backward(
            dx.to(head.dtype).contiguous(), head, mean, rstd, None, head.shape[0], channels, spatial, groups,
            [True, False, False])[0]
        if weight is not None:
            tangent.mul_(weight.reshape(channels, *([1] * (x.ndim - 2))))
        return out, tangent


@torch.no_grad()
def rms_norm(x: Tensor, dx: Tensor, axes: tuple[int, ...], eps: float, weight: Tensor | None) -> Tensor:
    """Tangent of x / sqrt(mean(x^2 over axes) + eps) w: rstd (dx - x_hat mean(x_hat dx)) w, x_hat = x rstd.

    The Jacobian before the weight is symmetric, like LayerNorm's.
    """
    dx = cast(dx, x.dtype)
    rstd = torch.rsqrt(x.square().mean(axes, keepdim=True) + eps)
    x_hat = x * rstd
    tangent = (dx - x_hat * (x_hat * dx).mean(axes, keepdim=True)).mul_(rstd)
    return tangent if weight is None else tangent.mul_(weight)


# name -> f'(x) dx from (dx, x, y = f(x), approximate): x and y the rows' input and output
ACTIVATIONS: dict[str, Callable[[Tensor, Tensor, Tensor | None, str], Tensor]] = {
    "sin": lambda dx, x, y, approximate: dx * x.cos(),
    "cos": lambda dx, x, y, approximate: -dx * x.sin(),
    "exp": lambda dx, x, y, approximate: dx * y,
    "gelu": lambda dx, x, y, approximate: aten.gelu_backward(dx, x, approximate=approximate),
    "silu": lambda dx, x, y, approximate: aten.silu_backward(dx, x),
    "relu": lambda dx, x, y, approximate: aten.threshold_backward(dx, x, 0),
    "sigmoid": lambda dx, x, y, approximate: aten.sigmoid_backward(dx, y),
    "tanh": lambda dx, x, y, approximate: aten.tanh_backward(dx, y),
}


@torch.no_grad()
def activation(name: str, dx: Tensor, x: Tensor, y: Tensor | None = None, approximate: str = "none") -> Tensor:
    """Tangent f'(x) dx of the elementwise function ``name`` (a key of :data:`ACTIVATIONS`) on the rows x;
    y: f(x) on the rows (exp, sigmoid and tanh need it)."""
    return ACTIVATIONS[name](cast(dx, x.dtype), x, y, approximate)


@torch.no_grad()
def softmax(dx: Tensor, p: Tensor, dim: int) -> Tensor:
    """Tangent of p = softmax(x) along ``dim``: p (dx - sum(p dx)), softmax's backward kernel (symmetric Jacobian)."""
    return torch._softmax_backward_data(cast(dx, p.dtype), p, dim % p.ndim, p.dtype)


def dropout(run: Run, rows: Rows, drop: Callable[[Tensor], Tensor], x: Tensor, dx: Tensor,
            inplace: bool = False) -> tuple[Tensor, Tensor]:
    """A dropout's output x mask / (1 - p) (B, ...) and its rows' tangent: one mask for both.

    ``drop(ones)`` is the dropout call on a tensor of ones: its one draw gives the scale
    mask / (1 - p) (from the generator as a plain call would draw it, or per sample under
    :class:`~meanflow.autodiff.per_sample.PerSampleDropout`), which multiplies the primal (the
    values and gradients of the plain call) and the tangent.
    """
    with torch.no_grad():
        scale = drop(torch.ones_like(x))
    out = run(torch.Tensor.mul_ if inplace else torch.mul, x, scale)
    with torch.no_grad():
        return out, dx * rows(scale)


@torch.no_grad()
def attention(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
              mask: Tensor | None = None, causal: bool = False, scale: float | None = None, gqa: bool = False,
              probs: Tensor | None = None) -> Tensor:
    """Tangent of softmax(q k^T scale + mask) v along (dq, dk, dv) (None: zero), for the rows.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev); ``probs`` (..., L, S) the softmax when the
    primal computed it. With p = softmax(s): ds = (dq k^T + q dk^T) scale, dp = p (ds - rowsum(p
    ds)) and d(p v) = dp v + p dv. On the CPU, (n, heads, tokens, features) operands whose heads do
    not merge with the batch without a copy go one head at a time (:func:`_by_head`).
    """
    if q.device.type == "cpu" and q.ndim == k.ndim == v.ndim == 4 and not all(map(heads_merge, (q, k, v, dq, dk, dv))):
        return _by_head(q, k, v, dq, dk, dv, mask, causal, scale, gqa, probs)
    return _attention(q, k, v, dq, dk, dv, mask, causal, scale, gqa, probs)


def _attention(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
               mask: Tensor | None, causal: bool, scale: float | None, gqa: bool, probs: Tensor | None) -> Tensor:
    """:func:`attention` on batched operands."""
    if gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
        dk = None if dk is None else dk.repeat_interleave(repeat, -3)
        dv = None if dv is None else dv.repeat_interleave(repeat, -3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_t = k.transpose(-2, -1)
    p = _probabilities(q, k_t, mask, causal, scale) if probs is None else probs  # (..., L, S)
    ds = None if dq is None else dq @ k_t
    if dk is not None:
        ds = accumulate(ds, q @ dk.transpose(-2, -1))
    out = None
    if ds is not None:
        out = cast(softmax(ds.mul_(scale), p, -1), v.dtype) @ v
    if dv is not None:
        out = accumulate(out, cast(p, dv.dtype) @ dv)
    return out


def _probabilities(q: Tensor, k_t: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """softmax(q k^T scale + mask), with the causal mask where asked: (..., L, S)."""
    scores = (q @ k_t).mul_(scale)
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def heads_merge(x: Tensor | None) -> bool:
    """Whether a (batch, heads, tokens, features) operand (or None) views as (batch heads, tokens, features) without a copy."""
    return x is None or x.ndim != 4 or x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _by_head(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
             mask: Tensor | None, causal: bool, scale: float | None, gqa: bool, probs: Tensor | None) -> Tensor:
    """:func:`attention` one head at a time, for operands whose heads do not merge with the batch.

    q: (n, heads, L, E), k: (n, kv heads, S, E), v: (n, kv heads, S, Ev), laid out as a timm-style
    ``qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)`` leaves them: each head is a strided
    (n, tokens, features) matrix batch that ``bmm`` reads in place, where the batched form would
    copy all six operands. Returns (n, heads, L, Ev), token-major in memory (a transpose of
    (n, L, heads, Ev)), so the usual ``transpose(1, 2).reshape(n, L, heads Ev)`` is a view.
    """
    count, group = q.shape[1], q.shape[1] // k.shape[1] if gqa else 1
    qs, dqs, ps = _heads(q, count), _heads(dq, count), _heads(probs, count)
    ks, vs, dks, dvs = (_heads(x, count // group) for x in (k, v, dk, dv))
    masks = [mask] * count if mask is None or mask.ndim < 3 else _heads(mask, count, dim=-3)
    out = None
    for h in range(count):
        kv = h // group
        head = _attention(qs[h], ks[kv], vs[kv], dqs[h], dks[kv], dvs[kv], masks[h], causal, scale, False, ps[h])
        if out is None:
            out = head.new_empty(head.shape[0], head.shape[1], count, head.shape[2])
        out[:, :, h] = head
    return out.transpose(1, 2)


def _heads(x: Tensor | None, count: int, dim: int = 1) -> Sequence[Tensor | None]:
    """The heads (dimension ``dim``, size ``count`` or 1 to broadcast) of x as views, in one unbind; None gives Nones."""
    if x is None:
        return [None] * count
    return x.unbind(dim) if x.shape[dim] == count else [x.select(dim, 0)] * count
