"""PyTorch forward-mode AD for a function whose primal output keeps its gradient and whose tangent does not.

:func:`forward_jvp` is what the JVP layer (:mod:`meanflow.autodiff.jvp`) uses for models that do
not take :class:`meanflow.autodiff.dual.Dual` values. The tangent is a stop-gradient quantity
(du/dt in a target), so nothing of it is recorded for the backward pass (:class:`LeanTangents`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

_LINEAR_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


class LeanTangents(TorchFunctionMode):
    """Forward-mode AD that records nothing of the tangent for the backward pass. Values are exact.

    PyTorch's forward-mode rules run with gradients enabled on primal values that require them,
    so by default every tangent op is recorded, and its inputs saved, by autograd. Here every op
    output gets its tangent detached, which frees that record at once, and linear layers and
    convolutions get the tangent as a single product with the detached weight, W tangent(x): the
    built-in rule also multiplies the input by a materialised zero weight tangent (parameters
    carry none). Calls whose weight or bias carries a tangent go through untouched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LINEAR_OPS:
            return _detach_tangents(func(*args, **kwargs))
        x, weight, rest = args[0], args[1], list(args[2:])
        bias = kwargs.pop("bias") if "bias" in kwargs else (rest.pop(0) if rest else None)
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None or _has_tangent(weight) or _has_tangent(bias):
            return func(x, weight, bias, *rest, **kwargs)
        out = func(primal, weight, bias, *rest, **kwargs)
        return fwAD.make_dual(out, func(tangent, weight.detach(), None, *rest, **kwargs))


@sdpa_kernel(SDPBackend.MATH)  # PyTorch's fused attention kernels have no forward-mode rule
def forward_jvp(
    fn: Callable[..., Tensor | tuple[Tensor, Tensor]],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor | None],
    *,
    has_aux: bool = False,
    compiled: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``fn(*primals)`` with gradient, its derivative along ``tangents`` without, and fn's aux output.

    Args:
        fn: returns a tensor, or (output, aux) with ``has_aux``; aux gets no tangent.
        primals: fn's tensor arguments, each (n, ...).
        tangents: one per primal, same shape, or None for an argument without tangent.
        compiled: fn calls a ``torch.compile``'d module, which ``torch.autograd.forward_ad``
            cannot go through; ``torch.func.jvp`` is used instead.

    ``F.scaled_dot_product_attention`` inside fn runs on its math kernel: PyTorch's fused kernels
    (flash, memory-efficient, cuDNN) have no forward-mode rule.

    Returns:
        (out, d_out, aux): out and aux carry gradients as a plain call would; d_out is detached.
    """
    if compiled:
        active = [i for i, tangent in enumerate(tangents) if tangent is not None]

        def partial(*values: Tensor):
            args = list(primals)
            for i, value in zip(active, values):
                args[i] = value
            return fn(*args)

        result = torch.func.jvp(partial, tuple(primals[i] for i in active), tuple(tangents[i] for i in active), has_aux=has_aux)
        return result[0], result[1].detach(), result[2] if has_aux else None
    with forward_mode():
        args = [p if tangent is None else fwAD.make_dual(p, tangent) for p, tangent in zip(primals, tangents)]
        result = fn(*args)
        out, aux = result if has_aux else (result, None)
        primal, tangent = fwAD.unpack_dual(out)
        aux = None if aux is None else fwAD.unpack_dual(aux).primal
        return primal, torch.zeros_like(primal) if tangent is None else tangent.detach(), aux


@contextmanager
def forward_mode() -> Iterator[None]:
    """A forward-AD level with :class:`LeanTangents`, where activations are saved without their tangents.

    Saving a dual tensor for backward would keep its tangent alive until the level closes; the
    pack hook saves the detached primal values instead.
    """
    with fwAD.dual_level(), LeanTangents(), torch.autograd.graph.saved_tensors_hooks(_detached, _identity):
        yield


def _detach_tangents(out):
    """An op's output (a tensor, or a tuple or list of them) with tangents detached from autograd."""
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(_detach_tangents(o) for o in out)
    if not isinstance(out, torch.Tensor):
        return out
    primal, tangent = fwAD.unpack_dual(out)
    if tangent is None or not tangent.requires_grad:
        return out
    return fwAD.make_dual(primal, tangent.detach())


def _detached(x: Tensor) -> Tensor:
    return x.detach()


def _identity(x: Tensor) -> Tensor:
    return x


def _has_tangent(x: Tensor | None) -> bool:
    return x is not None and fwAD.unpack_dual(x).tangent is not None
