"""Multi-head attention kernels that forward-mode AD (``torch.func.jvp``) can go through.

The MeanFlow target needs one Jacobian-vector product of the whole network, so every
attention call must support forward-mode AD. PyTorch's flash and memory-efficient SDPA
kernels have no forward-mode derivative; three backends do:

* ``"math"``: softmax(q k^T / sqrt(d)) v written with plain tensor ops. Exact, works
  everywhere (CPU, float64), memory O(N^2) per head.
* ``"sdpa"``: ``F.scaled_dot_product_attention`` (PyTorch picks its fastest kernel, flash
  attention on CUDA) when no forward-mode tangent is attached to q, k or v, as in sampling and
  evaluation; the ``"math"`` path while one is. (SDPA's own math kernel would also accept the
  tangent, but on an H100 it was no faster than the plain ops, twice slower in bfloat16 at
  1024 tokens, and its backward fails after a jvp under autocast in PyTorch 2.11.)
* ``"jvp_flash"``: the Triton kernel of the ``jvp-flash-attention`` package, which computes
  the output and its tangent in one fused pass (CUDA; float16, bfloat16, float32; head
  dimension 16, 32, 64 or 128; sequence length even and >= 32).

With :class:`meanflow.autodiff.dual.Dual` inputs (our models' MeanFlow training path) the primal
goes through the chosen backend, so flash attention and its backward serve the whole batch,
and the tangent of the r != t rows is computed beside it by :func:`meanflow.autodiff.rules.attention`
(the rule the row tangent uses for ``F.scaled_dot_product_attention``).

``"auto"`` (the default) picks ``jvp_flash`` when the package imports and the inputs suit the
kernel, ``sdpa`` for other CUDA inputs and ``math`` on the CPU. Override it per call with the
``backend`` argument or globally with the environment variable ``MEANFLOW_ATTENTION``.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from types import ModuleType

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ..autodiff import rules
from ..autodiff.dual import Dual

BACKENDS = ("auto", "math", "sdpa", "jvp_flash")
ENV_VAR = "MEANFLOW_ATTENTION"
JVP_FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
JVP_FLASH_HEAD_DIMS = (16, 32, 64, 128)  # the package also accepts 256, but its backward exceeds H100 shared memory
JVP_FLASH_MIN_TOKENS = 32


@lru_cache(maxsize=1)
def _jvp_flash_module() -> ModuleType | None:
    """The ``jvp_flash_attention.jvp_attention`` module, or None if it cannot be imported."""
    try:
        from jvp_flash_attention import jvp_attention
    except Exception:  # ImportError, or Triton failing to initialise on this machine
        return None
    return jvp_attention


def jvp_flash_available() -> bool:
    """True when the ``jvp-flash-attention`` package imports and CUDA is present."""
    return torch.cuda.is_available() and _jvp_flash_module() is not None


def jvp_flash_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the jvp-flash Triton kernel accepts these (B, heads, N, d) inputs."""
    n, d = q.shape[-2:]
    return (
        q.is_cuda
        and q.dtype in JVP_FLASH_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.shape == k.shape == v.shape
        and d in JVP_FLASH_HEAD_DIMS
        and n % 2 == 0
        and n >= JVP_FLASH_MIN_TOKENS
    )


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else ``$MEANFLOW_ATTENTION``, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"unknown attention backend {name!r} (from the {source}); choose one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> str:
    """The concrete backend ("math", "sdpa" or "jvp_flash") used for these inputs."""
    name = requested_backend(backend)
    if name == "jvp_flash":
        if not jvp_flash_available():
            raise RuntimeError(
                "attention backend 'jvp_flash' needs CUDA and the jvp-flash-attention package "
                "(pip install jvp-flash-attention); use 'auto', 'sdpa' or 'math' instead"
            )
        if not jvp_flash_supports(q, k, v):
            raise RuntimeError(
                f"attention backend 'jvp_flash' does not support inputs of shape {tuple(q.shape)}, dtype {q.dtype}, "
                f"device {q.device}: it needs CUDA {', '.join(str(d) for d in JVP_FLASH_DTYPES)}, head dimension in "
                f"{JVP_FLASH_HEAD_DIMS} and an even token count >= {JVP_FLASH_MIN_TOKENS}"
            )
        return name
    if name != "auto":
        return name
    if not q.is_cuda:
        return "math"
    return "jvp_flash" if jvp_flash_available() and jvp_flash_supports(q, k, v) else "sdpa"


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain ops. q, k, v: (B, heads, N, d) -> (B, heads, N, d)."""
    return _math_attention_and_probs(q, k, v)[0]


def _math_attention_and_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`math_attention` and its probabilities softmax(q k^T / sqrt(d)): (B, heads, N, d), (B, heads, N, N)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, N, N)
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


def _has_tangent(*tensors: torch.Tensor) -> bool:
    """True when any tensor carries a forward-mode tangent (inside torch.func.jvp or fwAD)."""
    return any(fwAD.unpack_dual(x).tangent is not None for x in tensors)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, or :func:`math_attention` when a tangent is present."""
    if _has_tangent(q, k, v):
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def jvp_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused Triton attention of ``jvp-flash-attention`` (output and tangent in one pass).

    Its ``fwd_dual`` entry point reads the tangents of q, k, v itself, which is what makes it
    correct under ``torch.func.jvp``; without tangents it is a plain flash-attention forward.
    The kernel's backward asserts that the output gradient has exactly the output's strides,
    which autograd does not guarantee for size-1 dimensions (one head, batch of one); passing
    the output through a flat view makes autograd hand back a gradient laid out like a fresh
    tensor.
    """
    out = _jvp_flash_module().JVPAttn.fwd_dual(q, k, v)  # (B, heads, N, d)
    return out.reshape(-1).view(out.shape)  # (B, heads, N, d)


_KERNELS = {"math": math_attention, "sdpa": sdpa_attention, "jvp_flash": jvp_flash_attention}


def attention(
    q: torch.Tensor | Dual, k: torch.Tensor | Dual, v: torch.Tensor | Dual, backend: str | None = None
) -> torch.Tensor | Dual:
    """Scaled dot-product attention that forward-mode AD and :class:`Dual` values can go through.

    Args:
        q, k, v: (B, heads, N, d) queries, keys and values; all plain tensors or all Duals.
        backend: "auto", "math", "sdpa" or "jvp_flash"; None reads ``$MEANFLOW_ATTENTION``
            (default "auto", see the module docstring).

    Returns:
        (B, heads, N, d) attention output (a Dual for Dual inputs).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention needs q, k, v of one shape (B, heads, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    duals = [isinstance(x, Dual) for x in (q, k, v)]
    if any(duals):
        if not all(duals) or len({q.rows, k.rows, v.rows}) != 1:
            raise ValueError("attention takes q, k, v all plain or all Duals over the same rows")
        name, probs = resolve_backend(q.primal, k.primal, v.primal, backend), None
        if name == "math":  # the primal's p serves the tangent
            out, probs = _math_attention_and_probs(q.primal, k.primal, v.primal)
            probs = probs[: q.rows].detach()
        else:
            out = _KERNELS[name](q.primal, k.primal, v.primal)
        tangent = rules.attention(q.head(), k.head(), v.head(), q.tangent, k.tangent, v.tangent, probs=probs)
        return Dual(out, tangent.to(out.dtype))
    return _KERNELS[resolve_backend(q, k, v, backend)](q, k, v)
