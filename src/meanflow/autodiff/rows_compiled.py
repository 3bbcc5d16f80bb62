"""The row tangent of a ``torch.compile``'d model, compiled with it.

:func:`~meanflow.autodiff.rows.row_jvp` is Python that runs beside every op of the model; dynamo
cannot trace it, so on a compiled model the row pass used to run eagerly and paid that Python on
every step (on a GPU, where a step is short, it dominated). Here the row pass is traced once per
input signature by ``make_fx`` at the pre-dispatch level: the model's code and the tangent rules
run on proxy tensors, and everything they compute, primal and tangent, is recorded as one graph of
ATen ops above autograd, with the rules' gradient-off regions kept (the tangent stays out of
autograd, as in the eager pass). That graph is compiled by ``torch.compile`` with the backend,
mode and options the model was compiled with, and called on later steps: no Python per op, and
the tangent's kernels fuse with the primal's. Parameters and buffers are inputs of the graph,
passed on every call, so gradients reach them and optimizer updates are seen.

A signature is everything the trace depends on: the shapes and dtypes of the inputs and of the
weights, which tangents are given, the grad and autocast modes, the model's training flag, whether per-sample
dropout is on.

Dropout under ``meanflow train``'s per-sample masks (:mod:`meanflow.autodiff.per_sample`) is
traced: a mask is a hash of a key and of the rows' global indices, both inputs of the graph; the
keys are drawn from the default generator just before each call, in the order the eager pass
draws them, and primal and tangent share each mask (drawn once, on ones), so the compiled pass
applies the eager pass's masks. Any other random draw is not traced (the compiled graph would
draw other numbers than the eager pass), nor is activation checkpointing (a
trace would flatten it and keep every activation): such models, and models whose trace fails,
run the eager row pass with a warning that says why. A model that mixes rows raises
:class:`~meanflow.autodiff.rows.RowMixingError`, as it does eagerly.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

from . import per_sample
from .per_sample import inside_checkpoint
from .rows import RowMixingError, row_jvp

_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
           "normal", "normal_", "uniform_", "exponential_", "multinomial", "random_", "cauchy_", "geometric_",
           "log_normal_"}

# model -> signature -> compiled row pass, or the reason it runs eagerly
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable | str]]" = weakref.WeakKeyDictionary()


class _TraceHazards(TorchFunctionMode):
    """Records the first call a trace would get wrong, as the reason to run eagerly.

    A random draw (see :func:`_draws`): the compiled graph would draw other numbers than the eager
    pass. A call inside activation checkpointing: traced flat, the
    recomputation that saves memory is gone.
    """

    def __init__(self):
        super().__init__()
        self.reason: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.reason is None:
            name = getattr(func, "__name__", "")
            if _draws(name, args, kwargs):
                self.reason = (f"its forward pass draws random numbers ({name}) outside meanflow train's per-sample "
                               "dropout, which a compiled graph would draw from its own random numbers")
            elif inside_checkpoint():
                self.reason = "it uses activation checkpointing (torch.utils.checkpoint), which a trace would drop"
        return func(*args, **kwargs)


def _draws(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the torch call ``name(*args, **kwargs)`` draws random numbers a trace would get wrong.

    Dropout under a :class:`~meanflow.autodiff.per_sample.PerSampleDropout` (``meanflow train``) does
    not: its mask is a hash of a key and of the rows' global indices, both inputs of the traced
    graph (:func:`_trace`).
    """
    if name in _DROPOUTS:
        _, p, training, _ = per_sample.dropout_args(args, kwargs)
        return per_sample.active() is None and training and p > 0
    if name == "scaled_dot_product_attention":
        return kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0) > 0
    return name in _RANDOM


def _row_pass(model: nn.Module, layout: tuple[bool, ...], keys: tuple[str, ...], return_v: bool,
              dropout: str | None = None) -> Callable:
    """fn(params, buffers, *tensors): ``row_jvp`` of ``model(z, r, t, labels, **conditioning)`` over (z, r, t).

    ``tensors`` are z, r, t, dz, dr, dt, labels where ``layout`` says they are given, then the
    conditioning values. Under per-sample dropout they end with the rows' global indices (n,), and
    with ``dropout="keys"`` also the (L, 2) keys of the pass's L dropout draws (``"count"``: the
    pass draws its keys itself, to count them).
    """
    extra = {"return_v": True} if return_v else {}

    def fn(params: dict[str, Tensor], buffers: dict[str, Tensor], *tensors: Tensor) -> tuple[Any, Any]:
        it = iter(tensors)
        z, r, t, dz, dr, dt, labels = (next(it) if given else None for given in layout)
        kwargs = dict(zip(keys, it), **extra)
        run = lambda z_, r_, t_: torch.func.functional_call(model, (params, buffers), (z_, r_, t_, labels), kwargs)  # noqa: E731
        if dropout is None:
            return row_jvp(run, (z, r, t), (dz, dr, dt))
        mode = per_sample.active()
        saved = mode.current, mode.keys
        mode.current = next(it)
        if dropout == "keys":
            mode.keys = iter(next(it).unbind(0))
        try:
            return row_jvp(run, (z, r, t), (dz, dr, dt))
        finally:
            mode.current, mode.keys = saved

    return fn


def compiled_row_jvp(
    compiled: nn.Module,
    inputs: tuple[Tensor, Tensor, Tensor],
    tangents: tuple[Tensor, Tensor | None, Tensor],
    labels: Tensor | None,
    conditioning: dict[str, Tensor],
    return_v: bool,
    eager: Callable[[], tuple[Any, Any]],
) -> tuple[Any, Any]:
    """What ``row_jvp`` of ``model(z, r, t, labels, **conditioning)`` returns, through the compiled row pass.

    Args:
        compiled: the model as ``torch.compile`` returned it; the row pass is compiled with its backend and options.
        inputs: z (B, ...), r (B,), t (B,); tangents: dz (n, ...), dr (n,) or None, dt (n,).
        eager: the eager row pass, called when the model cannot be traced (see the module docstring).
    """
    model, dropout = compiled._orig_mod, per_sample.active()
    optional = (*inputs, *tangents, labels)
    layout = tuple(x is not None for x in optional)
    tensors = (*[x for x in optional if x is not None], *conditioning.values(), *([dropout.current] if dropout else []))
    state = dict(model.named_parameters()), dict(model.named_buffers())
    key = _signature(model, tensors, [*state[0].values(), *state[1].values()], layout, tuple(conditioning), return_v,
                     dropout is not None)
    graphs = _GRAPHS.setdefault(model, {})
    if key not in graphs:
        row_pass = functools.partial(_row_pass, model, layout, tuple(conditioning), return_v)
        with torch.random.fork_rng(devices=[d for d in {x.device for x in tensors} if d.type == "cuda"]):
            graphs[key] = _trace(compiled, row_pass, state, tensors)  # the trace's draws leave the generators as they were
    graph = graphs[key]
    if isinstance(graph, str):
        return eager()
    return graph(*state, *tensors)


def _signature(model: nn.Module, tensors: Sequence[Tensor], weights: Sequence[Tensor], *rest: Any) -> tuple:
    """What a trace depends on: inputs' and weights' shapes, dtypes and devices, ``rest``, grad and autocast modes, train/eval."""
    device = tensors[0].device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    shapes = tuple((tuple(x.shape), x.dtype, x.device) for x in (*tensors, *weights))
    return shapes, *rest, torch.is_grad_enabled(), autocast, model.training


def _trace(compiled: nn.Module, row_pass: Callable[..., Callable], state: tuple[dict, dict],
           tensors: Sequence[Tensor]) -> Callable | str:
    """The row pass traced and compiled, or why it runs eagerly (said once, as a warning).

    Under per-sample dropout a first trace counts the L keys the pass draws; the second takes them
    as an input, and each call draws them just before the graph runs, as the eager pass would.
    """
    hazards, dropout = _TraceHazards(), per_sample.active()
    try:
        with hazards:
            if dropout is None:
                graph = make_fx(row_pass(), pre_dispatch=True)(*state, *tensors)
            else:
                drawn = dropout.drawn
                make_fx(row_pass("count"), pre_dispatch=True)(*state, *tensors)
                count, device = dropout.drawn - drawn, tensors[0].device
                keys = torch.zeros(count, 2, dtype=torch.long, device=device)  # only their shape matters to the trace
                graph = make_fx(row_pass("keys"), pre_dispatch=True)(*state, *tensors, keys)
    except RowMixingError:
        raise  # the model's own fault, compiled or not
    except Exception as failure:  # noqa: BLE001 - any other trace failure falls back to the exact eager pass
        reason = f"it could not be traced ({type(failure).__name__}: {str(failure).splitlines()[0][:200]})"
    else:
        if hazards.reason is None:
            graph = torch.compile(graph, backend=compile_backend(compiled))
            if dropout is None:
                return graph
            return lambda *args: graph(*args, per_sample.draw_keys(count, device))
        reason = hazards.reason
    warnings.warn(f"the row tangent of the compiled {type(compiled._orig_mod).__name__} runs eagerly: {reason}", stacklevel=4)
    return reason


def compile_backend(compiled: nn.Module) -> Any:
    """The backend, with its mode and options, that ``torch.compile`` gave ``compiled`` ("inductor" if unreadable).

    Read from the wrappers dynamo puts around the backend (``_torchdynamo_orig_backend``).
    """
    backend = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    return backend if callable(backend) else "inductor"
