"""Hand-written row-tangent rules for the ops that carry a network's cost.

Each rule runs the primal call unchanged (``call.run()``) and records, with gradients off,
the tangent of the output's tracked rows (``ctx.set``). The tangents of the ops that both engines
meet (linear, conv, norms, activations, softmax, attention, products, dropout) come from
:mod:`meanflow.autodiff.rules`; what is here finds the rows of each operand (the batch dimension
moves under views, and untracked operands are cut to the tracked rows where they have the batch)
and follows the ops only the row tangent meets:

    pooling, interpolation, padding         op(dx)
    matmul / bmm / einsum                   op(da, b) + op(a, db)
    + - /, fills, copies                    sum and quotient rules; zero for a fill
    views, casts, cat, indexing             the same op on dx, the batch dimension followed

Every other op takes the generic rule of :mod:`meanflow.autodiff.row_mode`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rules
from .row_mode import Call, Rule, RowTangents, Track, aligned_rows, dims_argument, generic, rule
from .rules import accumulate


def arg(call: Call, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of the (out-of-place) call, given by position ``index`` or by keyword."""
    if len(call.targs) > index:
        return call.targs[index]
    return call.tkwargs.get(name, default)


def rows_shape(ctx: RowTangents, x: Tensor, dim: int | None) -> list[int]:
    """x's shape with the batch dimension cut to the tracked rows."""
    shape = list(x.shape)
    if not ctx.full and dim is not None:
        shape[dim] = shape[dim] // ctx.batch * ctx.rows
    return shape


def site(ctx: RowTangents, call: Call, dim: int | None) -> tuple[rules.Run, rules.Rows]:
    """How a shared rule (:mod:`meanflow.autodiff.rules`) runs this call's primal and cuts a tensor to the tracked rows."""
    return call.run, lambda x: ctx.head(x) if ctx.track(x) is not None else rows_of(ctx, x, dim)


def rows_of(ctx: RowTangents, x: Tensor, dim: int | None) -> Tensor:
    """x (for instance an op's output) cut to the tracked rows along ``dim``, outside autograd (rules run with gradients off)."""
    return x.detach() if ctx.full or dim is None else x.narrow(dim, 0, x.shape[dim] // ctx.batch * ctx.rows)


def operand(ctx: RowTangents, x: Any, out: Tensor, dim: int | None) -> Any:
    """An operand's value on the rows an elementwise output ``out`` tracks along ``dim``."""
    if ctx.track(x) is not None:
        return ctx.head(x)
    return aligned_rows(ctx, x, out.ndim, dim, out.shape[dim] if dim is not None else ctx.batch)


def output_dim(ctx: RowTangents, out: Tensor, operands: list[Any]) -> int | None:
    """The batch dimension of a broadcasting (elementwise) op's output, from its tracked operands."""
    dims = {t.dim + out.ndim - x.ndim for x in operands if (t := ctx.track(x)) is not None and t.dim is not None}
    if len(dims) > 1:
        raise ctx.mixing(f"broadcasts operands whose batch dimensions land on different dimensions {sorted(dims)}")
    return dims.pop() if dims else None


def fit(ctx: RowTangents, tangent: Tensor, out: Tensor, dim: int | None) -> Tensor:
    """A (broadcast) tangent expanded to the shape of out's tracked rows."""
    shape = rows_shape(ctx, out, dim)
    return tangent if list(tangent.shape) == shape else tangent.expand(shape)


def probe_dim(call: Call, x: Tensor, dim: int | None) -> int | None:
    """Where a shape op sends x's dimension ``dim``: the op run on a meta tensor with that dimension grown."""
    if dim is None:
        return None
    shape = list(x.shape)
    shape[dim] += 1
    try:
        out = call.apply(torch.empty(shape, dtype=x.dtype, device="meta"))
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    outs = out if isinstance(out, (list, tuple)) else [out]
    real = call.apply(torch.empty(list(x.shape), dtype=x.dtype, device="meta"))
    real = real if isinstance(real, (list, tuple)) else [real]
    diff = [i for i, (a, b) in enumerate(zip(outs[0].shape, real[0].shape)) if a != b]
    return diff[0] if len(diff) == 1 else None


def on_tracked_input(fn: Callable[..., Any]) -> Rule:
    """A rule ``fn(ctx, call, x, track)`` for calls whose first argument x is the only tracked tensor; others go generic."""

    @functools.wraps(fn)
    def apply(ctx: RowTangents, call: Call) -> Any:
        first = tracked_first(ctx, call)
        return generic(ctx, call) if first is None else fn(ctx, call, *first)

    return apply


def tracked_first(ctx: RowTangents, call: Call) -> tuple[Tensor, Track] | None:
    """The first argument and its track when it is tracked (and the only tracked tensor argument), else None."""
    x = call.targs[0] if call.targs else None
    track = ctx.track(x)
    if track is None or any(ctx.track(a) is not None for a in call.targs[1:]):
        return None
    return None if call.tkwargs and any(ctx.track(a) is not None for a in call.tkwargs.values()) else (x, track)


# Views, casts and other ops that act on the tangent as on the primal -------------------------------
@rule("contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda",
      "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT", "mH", "H", "adjoint",
      "narrow", "select", "flip", "roll", "sum", "mean", "cumsum", "tril", "triu", "diagonal", "unfold",
      "chunk", "split", "unbind", "tensor_split", "split_with_sizes", "unsafe_chunk", "unsafe_split",
      "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "fold", "real", "imag", "conj")
@on_tracked_input
def same_op(ctx: RowTangents, call: Call, x: Tensor, track: Track, batch_first: bool = False) -> Any:
    """Linear, row-wise ops: the tangent is the op applied to the tangent (outputs may be a tuple)."""
    ctx.check_dims(dims_argument(call.name, call.targs, call.tkwargs), track, x.ndim)
    if batch_first:
        ctx.check_batch_first(track)
    out = call.run()
    tangent = call.apply(track.tangent)
    hint = probe_dim(call, x, track.dim) if ctx.full else None
    if isinstance(out, Tensor):
        ctx.set(out, tangent, hint)
    else:
        for o, t in zip(out, tangent):
            ctx.set(o, t, hint)
    return out


@rule("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
      "interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
@on_tracked_input
def batch_first_linear(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Linear ops that treat dimension 0 as the batch (pooling, interpolation)."""
    return same_op.__wrapped__(ctx, call, x, track, batch_first=True)


@rule("reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel")
@on_tracked_input
def reshape(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Reshapes: the tangent is reshaped alike, with the batch's size replaced by the rows' wherever it lands."""
    if len(call.targs) > 1 and isinstance(call.targs[1], torch.dtype):  # x.view(dtype) reinterprets bits
        return generic(ctx, call)
    out = call.run()
    dim, shape = reshape_dim(ctx, x.shape, track.dim, out.shape)
    ctx.set(out, track.tangent.reshape(shape), dim)
    return out


def reshape_dim(ctx: RowTangents, shape: torch.Size, dim: int | None, new: torch.Size) -> tuple[int | None, list[int]]:
    """Where the batch lands when ``shape`` (batch in ``dim``) is reshaped to ``new``, and the tangent's new shape.

    The tracked rows are the leading ``m`` entries of ``dim`` for every index of the dimensions
    before it. They stay a leading slice of one new dimension j when the dimensions before j hold
    the same elements as those before ``dim``, and the elements after j divide each row's block
    (batch outermost in a merge such as (B, heads) -> (B heads)).
    """
    if dim is None:
        return None, list(new)
    before, after, size = math.prod(shape[:dim]), math.prod(shape[dim + 1:]), shape[dim]
    per_row = size // ctx.batch * after  # elements of one sample within a block
    prefix = 1
    for j, extent in enumerate(new):
        if prefix == before and extent and per_row % math.prod(new[j + 1:]) == 0:
            k = per_row // math.prod(new[j + 1:])
            if k * ctx.batch == extent:
                out = list(new)
                out[j] = k * ctx.rows
                return j, out
        prefix *= extent
        if prefix > before:
            break
    raise ctx.mixing(f"reshapes {tuple(shape)} (batch in dimension {dim}) to {tuple(new)}, merging the batch with a dimension before it")


@rule("expand", "expand_as", "broadcast_to")
@on_tracked_input
def expand(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Broadcasting views: the batch dimension must keep its size."""
    out = call.run()
    dim = None if track.dim is None else track.dim + out.ndim - x.ndim
    if dim is not None and out.shape[dim] != x.shape[track.dim]:
        raise ctx.mixing(f"broadcasts the batch dimension {track.dim} of {tuple(x.shape)} to {tuple(out.shape)}")
    ctx.set(out, track.tangent.expand(rows_shape(ctx, out, dim)), dim)
    return out


def index_dims(ctx: RowTangents, index: Any, ndim: int, dim: int | None, size: int) -> int | None:
    """The output dimension of an indexed tensor's batch dimension ``dim`` (None: unknown).

    Raises unless the index leaves the batch dimension whole (``:`` or no entry for it).
    """
    entries = list(index) if isinstance(index, tuple) else [index]
    consumed = [0 if e is None or e is Ellipsis else (e.ndim if isinstance(e, Tensor) and e.dtype == torch.bool else 1)
                for e in entries]
    if Ellipsis in [e for e in entries if not isinstance(e, Tensor)]:
        at = next(i for i, e in enumerate(entries) if e is Ellipsis and not isinstance(e, Tensor))
        entries[at:at + 1] = [slice(None)] * (ndim - sum(consumed))
    position, out_dim, advanced = 0, 0, False
    for entry in entries:
        if dim is not None and position == dim and entry is not None:
            whole = isinstance(entry, slice) and entry.step in (None, 1) and entry.start in (None, 0) and (
                entry.stop is None or entry.stop >= size)
            if not whole:
                raise ctx.mixing(f"indexes the batch dimension {dim} with {entry!r}")
            return None if advanced else out_dim
        if entry is None:
            out_dim += 1
        elif isinstance(entry, slice):
            position, out_dim = position + 1, out_dim + 1
        elif isinstance(entry, int):
            position += 1
        else:  # advanced indexing on a dimension before the batch: placement depends on the indices
            advanced = True
            position += entry.ndim if isinstance(entry, Tensor) and entry.dtype == torch.bool else 1
    return None if advanced or dim is None else out_dim + (dim - position)


@rule("__getitem__")
@on_tracked_input
def getitem(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Indexing that keeps the batch dimension whole: the same index on the tangent."""
    index = call.targs[1]
    hint = index_dims(ctx, index, x.ndim, track.dim, x.shape[track.dim] if track.dim is not None else 0)
    out = call.run()
    ctx.set(out, track.tangent[index], hint)
    return out


@rule("__setitem__")
def setitem(ctx: RowTangents, call: Call) -> Any:
    """``x[index] = value`` with the batch dimension of x left whole: the same assignment on the tangents."""
    x, index, value = call.args
    track, value_track = ctx.track(x), ctx.track(value)
    if track is None:  # x gains a tangent: place its batch where the value's lands
        out_dim = value_track.dim + (x[index].ndim - value.ndim) if value_track.dim is not None else None
        dim = next((d for d in range(x.ndim) if index_dims(ctx, index, x.ndim, d, x.shape[d]) == out_dim), None) \
            if out_dim is not None else 0
        if dim is None:
            raise ctx.mixing(f"assigns a batch into {tuple(x.shape)} at {index!r} with no batch dimension to follow")
        tangent = x.new_zeros(rows_shape(ctx, x, dim))
    else:
        dim, tangent = track.dim, track.tangent.clone()
    index_dims(ctx, index, x.ndim, dim, x.shape[dim] if dim is not None else 0)
    out = call.run()
    tangent[index] = value_track.tangent if value_track is not None else 0
    ctx.set(x, tangent, dim)
    return out


@rule("cat", "concat", "concatenate", "stack")
def cat(ctx: RowTangents, call: Call) -> Any:
    """Concatenation along a dimension other than the batch; untracked members contribute zero tangents."""
    tensors, dim = arg(call, 0, "tensors"), arg(call, 1, "dim", 0)
    tracked = {ctx.track(x).dim for x in tensors if ctx.track(x) is not None}
    if len(tracked) != 1 or len({x.ndim for x in tensors}) != 1:
        raise ctx.mixing(f"joins tensors whose batch dimensions differ ({sorted(map(str, tracked))})")
    batch = tracked.pop()
    stack = call.name == "stack"
    if not stack and batch is not None and dim % tensors[0].ndim == batch:
        raise ctx.mixing(f"concatenates along the batch dimension {batch}")
    out = call.run()
    parts = [ctx.track(x).tangent if ctx.track(x) is not None else x.new_zeros(rows_shape(ctx, x, batch)) for x in tensors]
    tangent = (torch.stack if stack else torch.cat)(parts, dim)
    hint = None if batch is None else batch + int(stack and dim % out.ndim <= batch)
    ctx.set(out, tangent, hint)
    return out


@rule("pad")
@on_tracked_input
def pad(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.pad: the tangent padded alike, with zeros where the primal gets a constant."""
    mode = arg(call, 2, "mode", "constant")
    out = call.run()
    tangent = F.pad(track.tangent, arg(call, 1, "pad"), mode, 0.0 if mode == "constant" else None)
    ctx.set(out, tangent, track.dim)
    return out


# Fills: the value no longer depends on the inputs ---------------------------------------------------
@rule("zero_", "fill_", "normal_", "uniform_", "exponential_", "random_", "bernoulli_")
def fill(ctx: RowTangents, call: Call) -> Any:
    out = call.run()
    ctx.set(out, None)
    return out


@rule("copy_")
def copy(ctx: RowTangents, call: Call) -> Any:
    """``x.copy_(src)``: x takes src's tangent."""
    x, src = call.args[:2]
    dim = output_dim(ctx, x, [src])
    out = call.run()
    source = ctx.track(src)
    ctx.set(out, None if source is None else fit(ctx, source.tangent, x, dim), dim)
    return out


# Arithmetic ------------------------------------------------------------------------------------------
_SIGNS = {"add": (1, 1), "__add__": (1, 1), "__radd__": (1, 1), "sub": (1, -1), "__sub__": (1, -1),
          "subtract": (1, -1), "__rsub__": (-1, 1), "rsub": (-1, 1), "neg": (-1, 0), "__neg__": (-1, 0),
          "negative": (-1, 0), "positive": (1, 0), "__pos__": (1, 0)}


@rule(*_SIGNS)
def add(ctx: RowTangents, call: Call) -> Any:
    """a + alpha b and its relatives: the tangents' signed sum, broadcast to the output's rows."""
    a, b = call.targs[0], arg(call, 1, "other")
    sign_a, sign_b = _SIGNS[call.name]
    alpha = call.tkwargs.get("alpha", 1)
    sign_a, sign_b = (sign_a * alpha, sign_b) if call.name == "rsub" else (sign_a, sign_b * alpha)
    out = call.run()
    dim = output_dim(ctx, out, [a, b])
    terms = [t.tangent if s == 1 else t.tangent * s for x, s in ((a, sign_a), (b, sign_b)) if s and (t := ctx.track(x))]
    if len(terms) == 2 and not terms[0].is_contiguous():  # the sum takes the first term's layout: keep it dense
        terms.reverse()
    tangent = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    ctx.set(out, fit(ctx, tangent, out, dim), dim)
    return out


@rule("mul", "__mul__", "__rmul__", "multiply")
def mul(ctx: RowTangents, call: Call) -> Any:
    """a b: da b + a db."""
    a, b = call.targs[0], arg(call, 1, "other")
    out = call.run()
    dim = output_dim(ctx, out, [a, b])
    tangents = [t.tangent if (t := ctx.track(x)) is not None else None for x in (a, b)]
    values = [operand(ctx, x, out, dim) if t is not None else None for x, t in zip((b, a), tangents)]
    tangent = rules.product(tangents[0], values[0], values[1], tangents[1])
    ctx.set(out, fit(ctx, tangent, out, dim), dim)
    return out


@rule("div", "__truediv__", "divide", "true_divide", "__rtruediv__")
def div(ctx: RowTangents, call: Call) -> Any:
    """a / b: (da - (a / b) db) / b; integer-rounding division has no tangent."""
    a, b = call.targs[0], arg(call, 1, "other")
    if call.name == "__rtruediv__":
        a, b = b, a
    out = call.run()
    if call.tkwargs.get("rounding_mode") is not None:
        ctx.set(out, None)
        return out
    dim = output_dim(ctx, out, [a, b])
    tangent = 0
    if (ta := ctx.track(a)) is not None:
        tangent = ta.tangent
    if (tb := ctx.track(b)) is not None:
        tangent = tangent - rows_of(ctx, out, dim) * tb.tangent
    ctx.set(out, fit(ctx, tangent / operand(ctx, b, out, dim), out, dim), dim)
    return out


@rule("addcmul")
def addcmul(ctx: RowTangents, call: Call) -> Any:
    """c + value a b: dc + value (da b + a db)."""
    c, a, b = call.targs[:3]
    value = call.tkwargs.get("value", 1)
    out = call.run()
    dim = output_dim(ctx, out, [c, a, b])
    dc, da, db = (t.tangent if (t := ctx.track(x)) is not None else None for x in (c, a, b))
    tangent = rules.addcmul(dc, da, operand(ctx, b, out, dim) if da is not None else None,
                            operand(ctx, a, out, dim) if db is not None else None, db, value)
    ctx.set(out, fit(ctx, tangent, out, dim), dim)
    return out


# Elementwise functions ------------------------------------------------------------------------------
@rule(*rules.ACTIVATIONS)
@on_tracked_input
def activation(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """sin, cos, exp, GELU, SiLU, ReLU, sigmoid, tanh: f'(x) dx."""
    head = ctx.head(x)
    out = call.run()
    approximate = arg(call, 1, "approximate", "none") if call.name == "gelu" else "none"
    tangent = rules.activation(call.name, track.tangent, head, rows_of(ctx, out, track.dim), approximate)
    ctx.set(out, tangent, track.dim)
    return out


@rule("softmax")
@on_tracked_input
def softmax(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """softmax along a non-batch dimension: p (dx - sum(p dx)) through softmax's backward kernel."""
    dim = arg(call, 1, "dim")
    if dim is None:
        return generic(ctx, call)
    ctx.check_dims((dim,), track, x.ndim)
    out = call.run()
    tangent = rules.softmax(track.tangent, rows_of(ctx, out, track.dim), dim)
    ctx.set(out, tangent, track.dim)
    return out


# Linear layers ---------------------------------------------------------------------------------------
@rule("linear")
@on_tracked_input
def linear(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.linear with a tracked input: W dx."""
    if track.dim is not None and track.dim == x.ndim - 1:
        raise ctx.mixing("contracts the batch dimension (it is the last one)")
    out = call.run()
    ctx.set(out, rules.without_bias(F.linear, track.tangent, arg(call, 1, "weight")), track.dim)
    return out


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
@on_tracked_input
def conv(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Convolutions with a tracked input (batch in dimension 0): W * dx without the bias."""
    ctx.check_batch_first(track)
    out = call.run()
    kwargs = {k: v for k, v in call.tkwargs.items() if k != "bias"}
    tangent = rules.without_bias(call.tfunc, track.tangent, arg(call, 1, "weight"), *call.targs[3:], **kwargs)
    ctx.set(out, tangent, 0)
    return out


@rule("matmul", "__matmul__", "__rmatmul__", "mm", "bmm")
def matmul(ctx: RowTangents, call: Call) -> Any:
    """a @ b: da b + a db, with the other operand cut to the rows where it has the batch."""
    a, b = call.targs[0], arg(call, 1, "other", arg(call, 1, "mat2"))
    if call.name == "__rmatmul__":
        a, b = b, a
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.ndim < 2 or b.ndim < 2:
        return generic(ctx, call)
    track_a, track_b = ctx.track(a), ctx.track(b)
    out = call.run()
    dims = set()
    for track, x, contracted, kept in ((track_a, a, a.ndim - 1, a.ndim - 2), (track_b, b, b.ndim - 2, b.ndim - 1)):
        if track is None or track.dim is None:
            continue
        if track.dim == contracted:
            raise ctx.mixing(f"contracts the batch dimension {track.dim} of an operand of shape {tuple(x.shape)}")
        dims.add(out.ndim - x.ndim + track.dim if track.dim != kept else out.ndim - (2 if x is a else 1))
    if len(dims) > 1:
        raise ctx.mixing(f"multiplies operands whose batches land on different dimensions {sorted(dims)}")
    dim = dims.pop() if dims else None
    rows_a = ctx.head(a) if track_a is not None else matmul_operand(ctx, a, out, dim, left=True)
    rows_b = ctx.head(b) if track_b is not None else matmul_operand(ctx, b, out, dim, left=False)
    tangent = None if track_a is None else torch.matmul(track_a.tangent, rows_b)
    if track_b is not None:
        tangent = accumulate(tangent, torch.matmul(rows_a, track_b.tangent))
    ctx.set(out, tangent, dim)
    return out


def matmul_operand(ctx: RowTangents, x: Tensor, out: Tensor, dim: int | None, left: bool) -> Tensor:
    """An untracked matmul operand's value on the output's tracked rows."""
    if ctx.full or dim is None:
        return x.detach()
    if dim < out.ndim - 2:  # a broadcast batch dimension
        pos = dim - (out.ndim - x.ndim)
        return aligned_rows(ctx, x, out.ndim, dim, out.shape[dim]) if 0 <= pos < x.ndim - 2 else x.detach()
    if (dim == out.ndim - 2) == left:  # the rows of a, or the columns of b
        pos = x.ndim - 2 if left else x.ndim - 1
        return x.narrow(pos, 0, x.shape[pos] // ctx.batch * ctx.rows)
    return x.detach()


@rule("einsum")
def einsum(ctx: RowTangents, call: Call) -> Any:
    """einsum: the sum over tracked operands of the same contraction with that operand's tangent."""
    equation = arg(call, 0, "equation")
    operands = list(call.targs[1]) if len(call.targs) == 2 and isinstance(call.targs[1], (list, tuple)) else list(call.targs[1:])
    inputs, output = parse_einsum(equation, [x.ndim for x in operands])
    letters = {inputs[i][t.dim] for i, x in enumerate(operands) if (t := ctx.track(x)) is not None and t.dim is not None}
    if len(letters) != 1:
        return generic(ctx, call)
    (letter,) = letters
    if letter not in output:
        raise ctx.mixing(f"sums over the batch index {letter!r} of {equation!r}")
    out = call.run()
    dim = output.index(letter)
    explicit = ",".join(inputs) + "->" + output
    values = [ctx.head(x) if ctx.track(x) is not None else einsum_operand(ctx, x, inputs[i], letter, out.shape[dim])
              for i, x in enumerate(operands)]
    tangent = None
    for i, x in enumerate(operands):
        if (track := ctx.track(x)) is not None:
            term = torch.einsum(explicit, *values[:i], track.tangent, *values[i + 1:])
            tangent = accumulate(tangent, term)
    ctx.set(out, tangent, dim)
    return out


def einsum_operand(ctx: RowTangents, x: Tensor, subscripts: str, letter: str, size: int) -> Tensor:
    """An untracked einsum operand cut to the tracked rows along the batch index, where it has it."""
    if ctx.full or letter not in subscripts:
        return x.detach()
    pos = subscripts.index(letter)
    return x.narrow(pos, 0, size // ctx.batch * ctx.rows) if x.shape[pos] == size else x.detach()


def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Subscripts of each operand and of the output, with ``...`` written out as letters."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    inputs = lhs.split(",")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    widest = max((r - len(s.replace("...", "")) for s, r in zip(inputs, ranks) if "..." in s), default=0)
    fill = "".join(spare[:widest])
    inputs = [s.replace("...", fill[widest - (r - len(s.replace("...", ""))):]) for s, r in zip(inputs, ranks)]
    if not arrow:
        counts = {c: "".join(inputs).count(c) for c in "".join(inputs)}
        rhs = fill + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in fill))
    return inputs, rhs.replace("...", fill)


# Normalisations ----------------------------------------------------------------------------------
@rule("layer_norm")
@on_tracked_input
def layer_norm(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.layer_norm over trailing dimensions; mean and 1/std come with the primal (native kernel, same values)."""
    shape, weight, bias, eps = list(arg(call, 1, "normalized_shape")), arg(call, 2, "weight"), arg(call, 3, "bias"), arg(call, 4, "eps", 1e-5)
    if track.dim is not None and track.dim >= x.ndim - len(shape):
        raise ctx.mixing(f"normalises over the batch dimension {track.dim}")
    out, tangent = rules.layer_norm(*site(ctx, call, track.dim), x, track.tangent, shape, weight, bias, eps)
    ctx.set(out, tangent, track.dim)
    return out


@rule("group_norm")
@on_tracked_input
def group_norm(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.group_norm of (B, C, ...) input (batch in dimension 0)."""
    groups, weight, bias, eps = arg(call, 1, "num_groups"), arg(call, 2, "weight"), arg(call, 3, "bias"), arg(call, 4, "eps", 1e-5)
    ctx.check_batch_first(track)
    out, tangent = rules.group_norm(*site(ctx, call, 0), x, track.tangent, groups, weight, bias, eps)
    ctx.set(out, tangent, 0)
    return out


@rule("rms_norm")
@on_tracked_input
def rms_norm(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.rms_norm: rstd (dx - x_hat mean(x_hat dx)) w, x_hat = x rstd."""
    shape, weight, eps = list(arg(call, 1, "normalized_shape")), arg(call, 2, "weight"), arg(call, 3, "eps")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    if track.dim is not None and track.dim in axes:
        raise ctx.mixing(f"normalises over the batch dimension {track.dim}")
    out = call.run()
    head = ctx.head(x).to(out.dtype)
    tangent = rules.rms_norm(head, track.tangent, axes, torch.finfo(head.dtype).eps if eps is None else eps, weight)
    ctx.set(out, tangent, track.dim)
    return out


@rule("batch_norm")
@on_tracked_input
def batch_norm(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """F.batch_norm: with running statistics (eval) a per-channel scale; with batch statistics an error."""
    running_var, weight, training, eps = arg(call, 2, "running_var"), arg(call, 3, "weight"), arg(call, 5, "training", False), arg(call, 7, "eps", 1e-5)
    if training or running_var is None:
        raise ctx.mixing("normalises with statistics of the whole batch (BatchNorm in training mode); put the "
                         "model's BatchNorm layers in eval mode, or use GroupNorm / LayerNorm")
    ctx.check_batch_first(track)
    out = call.run()
    scale = torch.rsqrt(running_var + eps) if weight is None else weight * torch.rsqrt(running_var + eps)
    ctx.set(out, track.tangent * scale.reshape(-1, *([1] * (x.ndim - 2))).to(out.dtype), 0)
    return out


# Attention -----------------------------------------------------------------------------------------
@rule("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RowTangents, call: Call) -> Any:
    """F.scaled_dot_product_attention: the primal through PyTorch's kernel, the rows' tangent written out.

    With p = softmax(s), s = q k^T scale (+ mask): ds = (dq k^T + q dk^T) scale, dp = p (ds -
    rowsum(p ds)) (softmax's backward kernel) and d(p v) = dp v + p dv.
    """
    q, k, v = call.targs[:3]
    mask, dropout_p, causal = arg(call, 3, "attn_mask"), arg(call, 4, "dropout_p", 0.0), arg(call, 5, "is_causal", False)
    scale, gqa = arg(call, 6, "scale"), arg(call, 7, "enable_gqa", False)
    if ctx.track(mask) is not None:
        return generic(ctx, call)
    if dropout_p:
        raise ValueError(
            "scaled_dot_product_attention with dropout_p > 0 draws its dropout mask inside the kernel, where the row "
            "tangent cannot share it; pass dropout_p=0 (or apply nn.Dropout to the attention output)"
        )
    dims = {t.dim + 4 - x.ndim for x in (q, k, v) if (t := ctx.track(x)) is not None and t.dim is not None}
    if len(dims) > 1 or any(d >= 2 for d in dims):
        raise ctx.mixing(f"gets the batch in dimensions {sorted(dims)} of (batch, heads, tokens, features) inputs")
    out = call.run()
    dim = None if not dims else dims.pop() - (4 - out.ndim)
    size = out.shape[dim] if dim is not None else ctx.batch
    rows = [ctx.head(x) if ctx.track(x) is not None else aligned_rows(ctx, x, out.ndim, dim, size) for x in (q, k, v)]
    tangents = [t.tangent if (t := ctx.track(x)) is not None else None for x in (q, k, v)]
    mask = aligned_rows(ctx, mask, out.ndim, dim, size)
    tangent = rules.attention(*rows, *tangents, mask, causal, scale, gqa)
    ctx.set(out, tangent, dim)
    return out


# Randomness -------------------------------------------------------------------------------------------
@rule("dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "dropout_", "feature_dropout_")
@on_tracked_input
def dropout(ctx: RowTangents, call: Call, x: Tensor, track: Track) -> Any:
    """Dropout: the call drawn once, on ones, gives the mask that scales the primal and the tangent (:func:`rules.dropout`)."""
    p, training = arg(call, 1, "p", 0.5), arg(call, 2, "training", arg(call, 2, "train", True))
    if not training or p == 0.0:
        out = call.run()
        if out is not x:
            ctx.set(out, track.tangent, track.dim)
        return out
    drop = lambda ones: call.func(ones, *call.targs[1:], **call.tkwargs)  # noqa: E731  (the call, out of place)
    inplace = call.name.endswith("_") or call.args is not call.targs or call.kwargs is not call.tkwargs
    out, tangent = rules.dropout(*site(ctx, call, track.dim), drop, x, track.tangent, inplace)
    ctx.set(out, tangent, track.dim)
    return out


@rule("alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_", "normal")
def unsupported_random(ctx: RowTangents, call: Call) -> Any:
    raise NotImplementedError(
        f"{call.name}() draws random numbers that depend on a tensor carrying a row tangent; the row tangent "
        "cannot replay its draw. Use nn.Dropout, or the 'forward_ad' / 'full' JVP modes."
    )

