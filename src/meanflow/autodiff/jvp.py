"""The JVP layer: a model's output for a batch, with gradient, and its derivative along a tangent
for a subset of the rows, without gradient.

    out = jvp(model, z, r, t, labels, rows, Tangent(z=dz), mode="auto")
    out.u   (B, ...)  model(z, r, t, labels), recorded by autograd as a plain forward would be
    out.du  (n, ...)  d/de model(z + e dz, r + e dr, t + e dt) at e = 0 for the n ``rows``
    out.v   (B, ...)  the second head of a two-headed model (``return_v=True``), else None

Objectives call only this; how the derivative is computed is a *mode*, all exact:

* ``"dual"``: one forward pass over the whole batch, the selected rows first, on
  :class:`~meanflow.autodiff.dual.Dual` values that carry their tangent beside the primal outside
  autograd (models with ``supports_dual = True``; no tangent on r).
* ``"rows"``: any model written with ordinary torch ops. One plain forward pass over the whole
  batch, the selected rows first, while :func:`~meanflow.autodiff.rows.row_jvp` carries their
  tangent beside it outside autograd (a torch-function mode with a tangent rule per op). An op
  that mixes rows of the batch (BatchNorm in training mode, a reduction along it) raises
  :class:`~meanflow.autodiff.rows.RowMixingError`. On a ``torch.compile``'d model the row pass is
  traced once per input signature and compiled with it (:mod:`~meanflow.autodiff.rows_compiled`).
* ``"forward_ad"``: any model. The selected rows go through one forward-mode pass
  (:func:`~meanflow.autodiff.forward_ad.forward_jvp`), the others through a plain forward.
* ``"full"``: one forward-mode pass over the whole batch (zero tangent on the other rows): the
  reference computation.

``"auto"`` takes the first mode of :data:`AUTO_ORDER` that can run the call: ``dual`` for models
that support it, else ``rows``. A new mode is one :func:`register_mode` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .per_sample import model_rows
from .dual import Dual, supports_dual
from .forward_ad import forward_jvp
from .rows import row_jvp
from .rows_compiled import compiled_row_jvp


@dataclass(frozen=True)
class Tangent:
    """Direction of the derivative for the selected rows: z (n, ...); t and r a number or (n,)."""

    z: Tensor
    t: float | Tensor = 1.0
    r: float | Tensor = 0.0

    @property
    def moves_r(self) -> bool:
        """Whether r has a tangent (the Dual path takes none)."""
        return isinstance(self.r, Tensor) or self.r != 0.0

    def time(self, which: str, like: Tensor) -> Tensor:
        """The (n,) tangent of ``which`` ('t' or 'r') in the dtype and device of ``like`` (n,)."""
        value = getattr(self, which)
        return value.to(like) if isinstance(value, Tensor) else torch.full_like(like, value)


@dataclass(frozen=True)
class Call:
    """One batch call ``model(z, r, t, labels, **conditioning)``; with ``return_v`` it returns (u, v).

    z: (B, ...); r, t: (B,); labels: (B,) or None; conditioning: keyword tensors, each (B,).
    """

    model: nn.Module | Callable[..., Any]
    z: Tensor
    r: Tensor
    t: Tensor
    labels: Tensor | None = None
    conditioning: dict[str, Tensor] = field(default_factory=dict)
    return_v: bool = False
    rows: Tensor | None = None  # which rows of the caller's batch these are (None: all, in order)

    def take(self, index: Tensor) -> "Call":
        """The same call on rows ``index`` (n,)."""
        return replace(
            self, z=self.z[index], r=self.r[index], t=self.t[index], rows=index if self.rows is None else self.rows[index],
            labels=None if self.labels is None else self.labels[index],
            conditioning={k: v[index] for k, v in self.conditioning.items()},
        )

    def run(self, z: Any = None, r: Any = None, t: Any = None) -> Any:
        """The model's output with z, r, t replaced where given (tensors, Duals or dual tensors).

        Per-sample randomness inside the model (dropout) follows the rows (:func:`model_rows`).
        """
        extra = dict(self.conditioning, return_v=True) if self.return_v else self.conditioning
        with model_rows(self.rows):
            return self.model(self.z if z is None else z, self.r if r is None else r, self.t if t is None else t, self.labels, **extra)

    def split(self, out: Any) -> tuple[Any, Any]:
        """(u, v) of a model output; v is None without ``return_v``."""
        if not self.return_v:
            return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{type(self.model).__name__} was called with return_v=True but did not return a (u, v) pair")
        return out


@dataclass(frozen=True)
class JVPOut:
    """u (B, ...) with gradient; du (n, ...) without, in the order of ``rows``; v (B, ...) or None."""

    u: Tensor
    du: Tensor
    v: Tensor | None


@dataclass(frozen=True)
class JVPMode:
    """A way to compute :class:`JVPOut`. ``unsupported`` gives the reason it cannot run a call, or None."""

    name: str
    run: Callable[[Call, Tensor, Tangent], JVPOut]
    unsupported: Callable[[Call, Tangent], str | None]


MODES: dict[str, JVPMode] = {}
AUTO_ORDER: list[str] = []


def register_mode(mode: JVPMode, auto: bool = True, auto_before: str | None = None) -> None:
    """Make ``mode`` available by name; with ``auto``, "auto" tries it before ``auto_before`` (default: last)."""
    MODES[mode.name] = mode
    if mode.name in AUTO_ORDER:
        AUTO_ORDER.remove(mode.name)
    if auto:
        AUTO_ORDER.insert(AUTO_ORDER.index(auto_before) if auto_before in AUTO_ORDER else len(AUTO_ORDER), mode.name)


def mode_names() -> tuple[str, ...]:
    """'auto' and every registered mode."""
    return ("auto", *MODES)


def jvp(
    model: nn.Module | Callable[..., Any],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    labels: Tensor | None,
    rows: Tensor,
    tangent: Tangent,
    *,
    mode: str = "auto",
    conditioning: dict[str, Tensor] | None = None,
    return_v: bool = False,
) -> JVPOut:
    """u of the batch and its derivative along ``tangent`` for ``rows`` (module docstring).

    Args:
        z: (B, ...); r, t: (B,); labels: (B,) or None; rows: (n,) int64 indices, no repeats.
        tangent: tangent.z (n, ...) in the rows' order; tangent.t, tangent.r numbers or (n,).
        mode: "auto" or a registered mode name; all give the same values.
        conditioning: further keyword inputs of the model, each (B,) (e.g. omega for iMF models).
        return_v: the model returns (u, v) when called with return_v=True; v is returned too.
    """
    call = Call(model, z, r, t, labels, dict(conditioning or {}), return_v)
    if tangent.z.shape != (rows.numel(), *z.shape[1:]):
        raise ValueError(f"the tangent on z must have shape {(rows.numel(), *z.shape[1:])} (one row per selected row), got {tuple(tangent.z.shape)}")
    if not rows.numel():
        u, v = call.split(call.run())
        return JVPOut(u, z.new_zeros((0, *u.shape[1:])), v)
    return _choose(mode, call, tangent).run(call, rows, tangent)


def _choose(mode: str, call: Call, tangent: Tangent) -> JVPMode:
    if mode == "auto":
        return next(MODES[name] for name in AUTO_ORDER if MODES[name].unsupported(call, tangent) is None)
    if mode not in MODES:
        raise ValueError(f"jvp must be one of {', '.join(mode_names())}, got {mode!r}")
    reason = MODES[mode].unsupported(call, tangent)
    if reason is not None:
        raise ValueError(f"jvp={mode!r} cannot run here: {reason}; use jvp='auto' or 'forward_ad'")
    return MODES[mode]


def _dual_unsupported(call: Call, tangent: Tangent) -> str | None:
    if not supports_dual(call.model):
        return f"{type(call.model).__name__} does not take Dual inputs (supports_dual = True)"
    if tangent.moves_r:
        return "the Dual path takes no tangent on r"
    return None


def _dual(call: Call, rows: Tensor, tangent: Tangent) -> JVPOut:
    """One forward pass, ``rows`` first, with their tangent riding along as :class:`Dual` values."""
    ordered, inverse = _rows_first(call, rows)
    n = rows.numel()
    out = ordered.run(z=Dual(ordered.z, tangent.z.to(ordered.z.dtype)), t=Dual(ordered.t, tangent.time("t", ordered.t[:n])))
    u, v = ordered.split(out)
    if not isinstance(u, Dual):
        raise TypeError(f"{type(call.model).__name__} claims supports_dual but returned {type(u).__name__} for Dual inputs")
    return _in_batch_order(inverse, u.primal, u.tangent, v.primal if isinstance(v, Dual) else v)


def _rows(call: Call, rows: Tensor, tangent: Tangent) -> JVPOut:
    """One plain forward pass, ``rows`` first, with their tangent beside it (:func:`row_jvp`)."""
    ordered, inverse = _rows_first(call, rows)
    n = rows.numel()
    tangents = (
        tangent.z.to(ordered.z.dtype),
        tangent.time("r", ordered.r[:n]) if tangent.moves_r else None,
        tangent.time("t", ordered.t[:n]),
    )
    inputs = (ordered.z, ordered.r, ordered.t)
    eager = lambda: row_jvp(lambda z, r, t: ordered.run(z, r, t), inputs, tangents)  # noqa: E731
    if hasattr(call.model, "_orig_mod"):  # torch.compile'd: the row pass is compiled too
        with model_rows(ordered.rows):
            out, out_tangent = compiled_row_jvp(
                call.model, inputs, tangents, ordered.labels, ordered.conditioning, ordered.return_v, eager)
    else:
        out, out_tangent = eager()
    (u, v), du = ordered.split(out), ordered.split(out_tangent)[0]
    return _in_batch_order(inverse, u, du, v)


def _rows_first(call: Call, rows: Tensor) -> tuple[Call, Tensor]:
    """The call with ``rows`` first, then the others, and the permutation that restores the batch order."""
    order = torch.cat([rows, _complement(rows, call.z.shape[0])])
    return call.take(order), _inverse(order)


def _in_batch_order(inverse: Tensor, u: Tensor, du: Tensor, v: Tensor | None) -> JVPOut:
    """JVPOut with u and v (rows-first order) put back in the batch's order; du stays in the rows' order."""
    return JVPOut(u.index_select(0, inverse), du, None if v is None else v.index_select(0, inverse))


def _forward_ad(call: Call, rows: Tensor, tangent: Tangent) -> JVPOut:
    """Forward-mode AD on ``rows``, then a plain forward on the other rows."""
    rest = _complement(rows, call.z.shape[0])
    u, du, v = _forward(call.take(rows), tangent)
    if not rest.numel():
        return JVPOut(u, du, v)
    u_rest, v_rest = call.split(call.take(rest).run())
    inverse = _inverse(torch.cat([rows, rest]))
    u = torch.cat([u, u_rest]).index_select(0, inverse)
    return JVPOut(u, du, None if v is None else torch.cat([v, v_rest]).index_select(0, inverse))


def _full(call: Call, rows: Tensor, tangent: Tangent) -> JVPOut:
    """Forward-mode AD over the whole batch, zero tangent on the rows outside ``rows``."""
    def scatter(value: Tensor, like: Tensor) -> Tensor:
        full = torch.zeros_like(like)
        full[rows] = value.to(like.dtype)
        return full

    wide = Tangent(
        z=scatter(tangent.z, call.z),
        t=scatter(tangent.time("t", call.t[rows]), call.t),
        r=scatter(tangent.time("r", call.r[rows]), call.r) if tangent.moves_r else 0.0,
    )
    u, du, v = _forward(call, wide)
    return JVPOut(u, du[rows], v)


def _forward(call: Call, tangent: Tangent) -> tuple[Tensor, Tensor, Tensor | None]:
    """forward_jvp of the whole call: u with gradient, du detached, v (or None)."""
    tangents = (tangent.z.to(call.z.dtype), tangent.time("r", call.r) if tangent.moves_r else None, tangent.time("t", call.t))
    compiled = hasattr(call.model, "_orig_mod")
    return forward_jvp(lambda z, r, t: call.run(z, r, t), (call.z, call.r, call.t), tangents, has_aux=call.return_v, compiled=compiled)


def _complement(rows: Tensor, size: int) -> Tensor:
    """The indices in [0, size) not in ``rows``, ascending (int64, rows' device), without a host sync."""
    marked = torch.zeros(size, dtype=torch.int32, device=rows.device)
    marked[rows] = 1
    return torch.argsort(marked, stable=True)[: size - rows.numel()]


def _inverse(perm: Tensor) -> Tensor:
    """Inverse permutation: out[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


register_mode(JVPMode("dual", _dual, _dual_unsupported))
register_mode(JVPMode("forward_ad", _forward_ad, lambda call, tangent: None))
register_mode(JVPMode("full", _full, lambda call, tangent: None), auto=False)
register_mode(JVPMode("rows", _rows, lambda call, tangent: None), auto_before="forward_ad")
