"""One-pass row-subset tangents for any ``nn.Module``: :func:`row_jvp`.

``row_jvp(fn, primals, tangents)`` runs ``fn`` once on the whole batch, as a plain call, and
returns beside its output the derivative of the output's first n rows along the tangents: the
MeanFlow du/dt of the r != t rows for a model written with ordinary torch ops, without changes to
its code. How: :mod:`meanflow.autodiff.row_mode` (the torch-function mode and the generic exact
rule) and :mod:`meanflow.autodiff.row_rules` (hand-written rules for the costly ops).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from . import row_rules  # noqa: F401  (registers the hand-written rules)
from .row_mode import RowMixingError, RowTangents

__all__ = ["RowMixingError", "row_jvp"]


def _detached(x: Tensor) -> Tensor:
    return x.detach()


def _identity(x: Tensor) -> Tensor:
    return x


def row_jvp(fn: Callable[..., Any], primals: Sequence[Tensor], tangents: Sequence[Tensor | None]) -> tuple[Any, Any]:
    """``fn(*primals)`` as a plain call, and the derivative of its output's first n rows along ``tangents``.

    Args:
        fn: any function of tensors written with ordinary torch ops (a model's forward).
        primals: inputs, each with the batch (size B) in dimension 0.
        tangents: for each primal, the tangent of its first n rows, shape (n, *primal.shape[1:]),
            or None (no tangent); n is the same for all, 1 <= n <= B.

    Returns:
        ``(out, tangent)``: out exactly as ``fn(*primals)`` (same values, same autograd graph;
        each output tensor has the batch in dimension 0, (B, ...)), and the tangent of its first
        n rows, (n, ...), outside autograd, with the structure of out (zeros for an output that
        does not depend on the tangent inputs).

    Equivalent to ``torch.func.jvp`` of ``fn`` on the first n rows for functions that treat each
    sample on its own; an op that mixes rows raises :class:`RowMixingError`. ``torch.compile``'d
    code inside ``fn`` runs eagerly during the call (the mode is Python that dynamo cannot trace);
    :mod:`meanflow.autodiff.rows_compiled` traces the whole call into a graph and compiles that.
    """
    batch = {p.shape[0] for p in primals if p.ndim}
    rows = {t.shape[0] for t in tangents if t is not None}
    if len(batch) != 1 or len(rows) != 1 or len(primals) != len(tangents):
        raise ValueError(
            f"row_jvp needs one tangent (or None) per primal, primals with one batch size in dimension 0 and tangents "
            f"with one row count; got batch sizes {sorted(batch)}, tangent rows {sorted(rows)}"
        )
    mode = RowTangents(batch.pop(), rows.pop())
    for p, t in zip(primals, tangents):
        if t is None:
            continue
        if t.shape[1:] != p.shape[1:]:
            raise ValueError(f"a tangent must have its primal's shape after dimension 0: {tuple(t.shape)} for {tuple(p.shape)}")
        mode.set(p, t.detach(), 0)
    with torch.compiler.set_stance("force_eager"), mode, torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
        out = fn(*primals)
    return out, tree_map(lambda o: _output_tangent(mode, o), out)


def _output_tangent(mode: RowTangents, out: Any) -> Any:
    """The (n, ...) tangent of an output tensor's first n rows (batch moved to dimension 0)."""
    if not isinstance(out, Tensor):
        return None
    track = mode.track(out)
    if track is None:
        return out.detach().new_zeros(mode.rows, *out.shape[1:])
    tangent = track.tangent if track.dim in (0, None) else track.tangent.movedim(track.dim, 0)
    if tangent.shape[0] != mode.rows:
        raise RowMixingError(f"the output of shape {tuple(out.shape)} does not have the batch in dimension 0")
    return tangent

