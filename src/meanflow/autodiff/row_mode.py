"""The torch-function mode behind :func:`meanflow.autodiff.rows.row_jvp`: row tangents beside a plain forward.

The MeanFlow target needs du/dt for the first n rows of a batch of B. :func:`row_jvp` runs the
user's function once, unchanged, on the whole batch: real tensors flow through the user's code
and autograd exactly as in a plain call (the output is bit-identical and carries the same
gradients). A :class:`RowTangents` torch-function mode watches every torch call of that run and
keeps, in a side table, the tangent of the first n rows of each tensor that depends on the
tangent inputs, computed with gradients off: nothing of it enters autograd.

A tracked tensor's tangent covers ``primal.narrow(dim, 0, m)``: ``dim`` is where the batch is now
(it moves under permute, transpose, reshape, chunk, unbind, ...), and ``m = n k`` when the batch is
merged with k following elements into one dimension (a ``reshape(B * heads, N, d)``), batch
outermost. The tangent rules live in :mod:`meanflow.autodiff.row_rules`: hand-written ones for the
ops that carry the cost (linear, conv, matmul/bmm/einsum, layer/group/RMS norm, softmax,
``F.scaled_dot_product_attention``, GELU/SiLU/..., arithmetic, views), and for any other op an exact
generic rule: PyTorch's own forward-mode derivative (``torch.func.jvp``) of the op on the n rows.
An op that mixes rows of the batch (BatchNorm in training mode, a reduction, scan, sort or index
along the batch dimension) raises :class:`RowMixingError` naming the op: it would make one
sample's output depend on the others'.

Lifetime: a tangent lives as long as its primal's Python object. Autograd would keep the objects
of saved activations alive until backward, so during the run saved tensors are stored as
detached aliases (``saved_tensors_hooks``), and each tangent is freed with the last Python
reference to its primal, as the activations of a plain forward are.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten


class RowMixingError(RuntimeError):
    """An op of the user's model acts along the batch dimension, so rows would depend on each other."""


class Track(NamedTuple):
    """The tangent (…, m, …) of ``primal.narrow(dim, 0, m)``; dim is None only when every row is tracked and it is unknown."""

    tangent: Tensor
    dim: int | None


class Call(NamedTuple):
    """One intercepted torch call: the primal side (func, args, kwargs) and the out-of-place form for tangents.

    A named tuple, as one is built for every intercepted call (cheaper than a dataclass).
    """

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    tfunc: Callable
    targs: tuple
    tkwargs: dict
    grad: bool  # the grad mode of the user's code at the call

    def run(self, func: Callable | None = None, *args: Any) -> Any:
        """The primal: the call exactly as the user's code made it (or ``func(*args)``), in the user's grad mode.

        Rules run with gradients off (their tangents stay out of autograd); every primal goes through here.
        """
        torch._C._set_grad_enabled(self.grad)
        try:
            return self.func(*self.args, **self.kwargs) if func is None else func(*args)
        finally:
            torch._C._set_grad_enabled(False)

    def apply(self, tangent: Tensor, *args, **kwargs) -> Any:
        """The out-of-place op applied to a tangent, with the call's other arguments unless given."""
        args = args or self.targs[1:]
        return self.tfunc(tangent, *args, **(kwargs or self.tkwargs))


Rule = Callable[["RowTangents", Call], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a tangent rule for the torch functions / Tensor methods of these names."""

    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


# Calls answered without looking at tangents (metadata, no tensor derived from values).
_PASSTHROUGH = frozenset({
    "shape", "ndim", "dtype", "device", "size", "dim", "numel", "is_contiguous", "stride", "requires_grad",
    "is_floating_point", "is_complex", "layout", "is_cuda", "grad_fn", "is_leaf", "data_ptr", "element_size",
    "__len__", "__format__", "__repr__", "__bool__", "item", "tolist", "nelement", "storage_offset", "get_device",
    "untyped_storage", "__hash__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "eq", "ne", "lt", "le",
    "gt", "ge", "isfinite", "isnan", "isinf", "argmax", "argmin", "sign", "floor", "ceil", "round", "trunc",
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "new_tensor", "detach", "data", "requires_grad_", "retain_grad", "register_hook", "__iter__",
})
_INPLACE_DUNDERS = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__",
                    "__ipow__": "__pow__", "__imatmul__": "__matmul__"}
# position of the ``inplace`` argument of functional ops that take one
_INPLACE_ARG = {"relu": 1, "silu": 1, "relu6": 1, "hardswish": 1, "mish": 1, "hardsigmoid": 1, "selu": 1, "celu": 2,
                "elu": 2, "leaky_relu": 2, "hardtanh": 3, "dropout": 3, "dropout1d": 3, "dropout2d": 3, "dropout3d": 3,
                "threshold": 3}


def op_name(func: Callable) -> str:
    """The torch function's name, e.g. "linear", "add_", "__getitem__", "shape" (for the getter)."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a Tensor property getter (x.shape, x.T, ...)
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class RowTangents(TorchFunctionMode):
    """Torch-function mode carrying the tangents of the first ``rows`` rows of a batch of ``batch``.

    Tensors enter the table through :meth:`set`; every torch call with a tracked argument goes
    through its rule in :data:`RULES` (or the generic rule), which runs the primal call unchanged.
    """

    def __init__(self, batch: int, rows: int):
        super().__init__()
        if not 0 < rows <= batch:
            raise ValueError(f"row tangents need 0 < rows <= batch, got rows={rows}, batch={batch}")
        self.batch, self.rows = batch, rows
        self.full = rows == batch  # every row carries a tangent (then tangents have their primal's shape)
        self.op = "<input>"  # the name of the op being handled, for error messages
        # id(tensor) -> Track of the live tracked tensors, and their weak references that forget them at death:
        # a dict lookup by id is what every intercepted call pays (a WeakIdKeyDictionary builds a reference per lookup)
        self._table: dict[int, Track] = {}
        self._entries: dict[int, weakref.ref] = {}
        self._snapshots: dict[int, Tensor] = {}

    # Table --------------------------------------------------------------------------------------
    def track(self, x: Any) -> Track | None:
        """The :class:`Track` of a tensor, or None (no tangent: zero)."""
        return self._table.get(id(x)) if isinstance(x, Tensor) else None

    def tracked(self) -> int:
        """How many live tensors carry a tangent."""
        return len(self._table)

    def head(self, x: Tensor) -> Tensor:
        """The tracked rows of x's primal: ``x.narrow(dim, 0, m)`` (its value before an in-place op).

        Outside autograd: rules run with gradients off, so the narrowed view records nothing.
        """
        snapshot = self._snapshots.get(id(x))
        if snapshot is not None:
            return snapshot
        track = self._table[id(x)]
        if self.full or track.dim is None:
            return x.detach()
        return x.narrow(track.dim, 0, track.tangent.shape[track.dim])

    def set(self, out: Tensor, tangent: Tensor | None, hint: int | None = None) -> None:
        """Record the tangent of out's tracked rows; hint is out's batch dimension where known.

        The batch dimension is the one where tangent and primal sizes differ (B k against n k);
        when every row is tracked the sizes agree and the hint is used. Raises
        :class:`RowMixingError` when the shapes say that the op acted along the batch dimension.
        """
        key = id(out)
        if tangent is None or not (out.is_floating_point() or out.is_complex()):
            self._table.pop(key, None)
            self._entries.pop(key, None)
            return
        if tangent.dtype != out.dtype:
            tangent = tangent.to(out.dtype)
        self._table[key] = Track(tangent, self._batch_dim(out, tangent, hint))
        if key not in self._entries:
            self._entries[key] = weakref.ref(out, functools.partial(self._forget, key))

    def _forget(self, key: int, entry: weakref.ref) -> None:
        """Weak-reference callback: the tracked tensor ``id`` key died, its tangent goes with it."""
        if self._entries.get(key) is entry:
            del self._entries[key], self._table[key]

    def _batch_dim(self, out: Tensor, tangent: Tensor, hint: int | None) -> int | None:
        if tangent.ndim != out.ndim:
            raise self.mixing(f"gave a tangent of shape {tuple(tangent.shape)} for an output of shape {tuple(out.shape)}")
        if self.full:
            if tangent.shape != out.shape:
                raise self.mixing(f"gave a tangent of shape {tuple(tangent.shape)} for an output of shape {tuple(out.shape)}")
            return hint % out.ndim if hint is not None and out.ndim and out.shape[hint] % self.batch == 0 else None
        shape, rows_shape = out.shape, tangent.shape
        if hint is not None and 0 <= hint < len(shape) and shape[:hint] == rows_shape[:hint] \
                and shape[hint + 1:] == rows_shape[hint + 1:]:
            dim = hint  # the common case, checked without a loop: only the hinted dimension can differ
        else:
            diff = [i for i, (a, b) in enumerate(zip(shape, rows_shape)) if a != b]
            if len(diff) != 1:
                raise self.mixing(f"turned the batch of {self.batch} into an output of shape {tuple(out.shape)}")
            (dim,) = diff
        size, rows = out.shape[dim], tangent.shape[dim]
        if size % self.batch or rows != size // self.batch * self.rows:
            raise self.mixing(f"changed the size of the batch dimension to {size} (dimension {dim} of {tuple(out.shape)})")
        return dim

    def mixing(self, what: str) -> RowMixingError:
        """The error for an op that mixes the rows of the batch."""
        label = self.op if self.op.startswith("<") else f"{self.op}()"
        return RowMixingError(
            f"{label} {what}: it acts along the batch dimension, so one sample's output would depend on other "
            "samples'. The one-pass row tangent follows only ops that treat each sample on its own; keep this op off "
            "the batch dimension (or use the 'forward_ad' / 'full' JVP modes)."
        )

    def check_dims(self, dims: Sequence[int] | None, track: Track, ndim: int) -> None:
        """Raise unless every dimension in dims (None: all) differs from the tracked batch dimension."""
        if track.dim is None:
            return
        if dims is None or track.dim in [d % max(ndim, 1) for d in dims]:
            raise self.mixing(f"acts along dimension {track.dim}, the batch dimension")

    def check_batch_first(self, track: Track) -> None:
        """Raise unless the batch is in dimension 0 (ops such as conv and group_norm take it there)."""
        if track.dim not in (0, None):
            raise self.mixing(f"treats dimension 0 as the batch, but the batch is in dimension {track.dim}")

    # Dispatch -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if name in _PASSTHROUGH or not self._any_tracked(args, kwargs):
            return func(*args, **kwargs)
        self.op = name
        call = self._call(name, func, args, kwargs)
        target = args[0] if args else None
        snapshot = call.func is not call.tfunc or call.args is not call.targs or call.kwargs is not call.tkwargs
        torch._C._set_grad_enabled(False)
        try:
            if snapshot and self.track(target) is not None:  # in-place: keep the rows' value from before
                self._snapshots[id(target)] = self.head(target).clone()
            return RULES.get(call.name, generic)(self, call)
        finally:
            torch._C._set_grad_enabled(call.grad)
            if snapshot:
                self._snapshots.pop(id(target), None)

    def _any_tracked(self, args: tuple, kwargs: dict) -> bool:
        table = self._table
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, Tensor):
                if id(a) in table:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(x, Tensor) and id(x) in table for x in a):
                    return True
        return False

    @staticmethod
    def _call(name: str, func: Callable, args: tuple, kwargs: dict) -> Call:
        """The call, with the out-of-place form of an in-place op (``add_`` -> ``add``, ``inplace=True`` -> False)."""
        call = Call(name, func, args, kwargs, func, args, kwargs, torch.is_grad_enabled())
        base = _INPLACE_DUNDERS.get(name) or (name[:-1] if name.endswith("_") and not name.endswith("__") else None)
        if base is not None and hasattr(Tensor, base):
            return call._replace(name=base, tfunc=getattr(Tensor, base))
        if name in _INPLACE_ARG:
            index = _INPLACE_ARG[name]
            if kwargs.get("inplace"):
                return call._replace(tkwargs={**kwargs, "inplace": False})
            if len(args) > index and args[index]:
                return call._replace(targs=(*args[:index], False, *args[index + 1:]))
        return call


# The generic rule ---------------------------------------------------------------------------------
_DIM_FIRST = ("sum", "mean", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "narrow", "select", "flip",
              "softmax", "log_softmax", "amax", "amin", "prod", "std", "var", "std_mean", "var_mean", "logsumexp",
              "sort", "argsort", "gather", "index_select", "scatter", "scatter_add", "index_add", "median", "mode",
              "nansum", "nanmean", "count_nonzero", "all", "any", "max", "min", "unflatten", "squeeze", "kthvalue",
              "unique_consecutive", "renorm", "diff", "index_fill", "index_copy", "nanmedian")
_DIM_SECOND = ("roll", "topk", "take_along_dim", "repeat_interleave", "normalize", "norm", "unfold")
_DIM_DEFAULTS = {"normalize": (1,), "sort": (-1,), "argsort": (-1,), "topk": (-1,), "squeeze": (), "diff": (-1,),
                 "cumsum": (), "cumprod": (), "softmax": (), "log_softmax": (), "unfold": ()}


def dims_argument(name: str, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The dimensions an op acts along (None: all of them) for ops with a ``dim`` / ``dims`` argument."""
    value = kwargs.get("dim", kwargs.get("dims", kwargs.get("axis")))
    if value is None:
        position = 1 if name in _DIM_FIRST else 2 if name in _DIM_SECOND else None
        if position is None:
            return ()
        value = args[position] if len(args) > position else None
        if isinstance(value, Tensor) or (name in ("max", "min") and value is None and len(args) > 1):
            return ()  # max(x, y): elementwise
        if value is None:
            return _DIM_DEFAULTS.get(name)
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value) if value else None
    return ()


def aligned_rows(ctx: RowTangents, x: Any, out_ndim: int, out_dim: int | None, out_size: int) -> Any:
    """An untracked operand cut to the tracked rows when it has the batch dimension (broadcasting, right-aligned).

    Its dimension aligned with the output's batch dimension ``out_dim`` is narrowed when it has
    the batch's size there; otherwise (size 1, absent, scalar) it broadcasts and is used whole.
    """
    if not isinstance(x, Tensor) or ctx.full or out_dim is None:
        return x
    pos = out_dim - (out_ndim - x.ndim)
    if 0 <= pos < x.ndim and x.shape[pos] == out_size and out_size > 1:
        return x.narrow(pos, 0, out_size // ctx.batch * ctx.rows)  # gradients are off in rules
    return x.detach()


def reference(ctx: RowTangents, tensors: Sequence[Any]) -> tuple[Tensor, Track]:
    """The tracked tensor of highest rank among tensors (and its track): the alignment reference."""
    tracked = [(x, ctx.track(x)) for x in tensors if ctx.track(x) is not None]
    return max(tracked, key=lambda pair: pair[0].ndim)


def generic(ctx: RowTangents, call: Call) -> Any:
    """Exact tangent of any row-wise op: ``torch.func.jvp`` of the op on the tracked rows.

    Tracked tensors enter with their rows and tangents; untracked tensors with the batch size in
    the dimension aligned (broadcasting) with the batch are cut to the same rows. Ops with a
    ``dim`` argument along the batch raise :class:`RowMixingError`.
    """
    leaves, spec = tree_flatten((call.targs, call.tkwargs))
    x, track = reference(ctx, leaves)
    ctx.check_dims(dims_argument(call.name, call.targs, call.tkwargs), track, x.ndim)
    out = call.run()
    outs, out_spec = tree_flatten(out)
    if not any(isinstance(o, Tensor) and (o.is_floating_point() or o.is_complex()) for o in outs):
        return out
    size = x.shape[track.dim] if track.dim is not None else ctx.batch
    slots, primals, tangents = [], [], []
    for i, leaf in enumerate(leaves):
        leaf_track = ctx.track(leaf)
        if leaf_track is not None:
            slots.append(i)
            primals.append(ctx.head(leaf))
            tangents.append(leaf_track.tangent)
        else:
            leaves[i] = aligned_rows(ctx, leaf, x.ndim, track.dim, size)
    float_outs = [i for i, o in enumerate(outs) if isinstance(o, Tensor) and (o.is_floating_point() or o.is_complex())]

    def on_rows(*values: Tensor) -> tuple[Tensor, ...]:
        for i, v in zip(slots, values):
            leaves[i] = v
        a, k = tree_unflatten(leaves, spec)
        result = tree_flatten(call.tfunc(*a, **k))[0]
        return tuple(result[i] for i in float_outs)

    _, out_tangents = torch.func.jvp(on_rows, tuple(primals), tuple(tangents))
    hint = None if track.dim is None else track.dim + (outs[float_outs[0]].ndim - x.ndim)
    for i, tangent in zip(float_outs, out_tangents):
        ctx.set(outs[i], tangent, hint)
        dim = ctx.track(outs[i]).dim
        if dim is not None and outs[i].shape[dim] != size:
            raise ctx.mixing(f"changed the size of the batch dimension from {size} to {outs[i].shape[dim]}")
    return tree_unflatten(outs, out_spec)
