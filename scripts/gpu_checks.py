"""GPU check of the attention backends under forward-mode AD (a script, not a pytest file).

For a DiT-B/4 (4x32x32 latents, 1000 classes) and the CIFAR-10 U-Net it compares the output u
and the MeanFlow JVP du/dt = jvp(u, (z, r, t), (v, 0, 1)), by forward-mode AD and through
``Dual`` values (the training path, column "err dual"), of every attention backend ("auto",
which picks jvp_flash when the jvp-flash-attention package is installed, "sdpa" and "math")
against a float32 math-path reference with TF32 off, in three precisions: float32, bfloat16
(weights and images in bf16, times r, t kept in float32) and bf16 autocast over float32
weights. It also times one training step (jvp + loss + backward) per backend, with its peak
GPU memory (``--split-jvp``: jvp without gradient plus a separate forward with gradient), and
the attention alone (jvp + backward) at several token counts.

A backend fails when its relative error (max |x - ref| / max |ref|) exceeds both twice the
math path's error in the same precision and a floor (float32 1e-2, since Triton multiplies in
TF32; bf16 5e-2). Exit status 1 on any failure, 2 without CUDA.

    python scripts/gpu_checks.py [--batch 32] [--steps 10] [--models dit-b/4 unet-cifar10]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch

import meanflow.models.attention as attn
from meanflow.models import create
from meanflow.autodiff.dual import Dual
from meanflow.autodiff.forward_ad import forward_jvp

LATENT = dict(in_channels=4, input_size=32, num_classes=1000)
MODELS = {
    "dit-b/4": LATENT,
    "dit-b/2": LATENT,
    "dit-xl/2": LATENT,
    "unet-cifar10": dict(in_channels=3, input_size=32, num_classes=0, dropout=0.0),
}
# precision: (weight and image dtype, autocast dtype or None, error floor)
PRECISIONS = {
    "float32": (torch.float32, None, 1e-2),
    "bfloat16": (torch.bfloat16, None, 5e-2),
    "autocast": (torch.float32, torch.bfloat16, 5e-2),
}
BACKENDS = ("auto", "sdpa", "math")


def record_backends() -> Counter:
    """Count the concrete backend of every attention call (wraps attn.resolve_backend)."""
    seen: Counter = Counter()
    resolve = attn.resolve_backend

    def recording(*args, **kwargs):
        name = resolve(*args, **kwargs)
        seen[name] += 1
        return name

    attn.resolve_backend = recording
    return seen


def build(name: str, device: torch.device) -> torch.nn.Module:
    """The preset with every parameter perturbed, so adaLN-Zero / zero-init layers are not 0."""
    torch.manual_seed(0)
    model = create(name, **MODELS[name]).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def make_inputs(model: torch.nn.Module, batch: int, device: torch.device) -> tuple:
    """z, v (B, C, H, W) and r <= t (B,), labels (B,) or None, float32."""
    g = torch.Generator(device=device).manual_seed(1)
    shape = (batch, model.in_channels, *model.input_size)
    z = torch.randn(shape, generator=g, device=device)
    v = torch.randn(shape, generator=g, device=device)
    t, r = torch.rand(2, batch, generator=g, device=device).sort(dim=0, descending=True).values
    labels = torch.randint(0, model.num_classes, (batch,), generator=g, device=device) if model.num_classes else None
    return z, v, r, t, labels


def jvp(model: torch.nn.Module, z, v, r, t, labels, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """u and du/dt along the tangent (v, 0, 1) by forward-mode AD, optionally under CUDA autocast.

    Through the library's :func:`forward_jvp` rather than ``torch.func.jvp``, whose CUDA rule for
    layer norm in bfloat16 hands the next layer a float32 tangent (torch 2.11).
    """
    with torch.autocast("cuda", dtype=autocast) if autocast else nullcontext():
        u, dudt, _ = forward_jvp(lambda z_, r_, t_: model(z_, r_, t_, labels), (z, r, t), (v, None, torch.ones_like(t)))
        return u, dudt


def dual_jvp(model: torch.nn.Module, z, v, r, t, labels, autocast: torch.dtype | None = None) -> torch.Tensor:
    """du/dt of every row through Dual values (the training path of our models), optionally under autocast."""
    with torch.autocast("cuda", dtype=autocast) if autocast else nullcontext():
        return model(Dual(z, v), r, Dual(t, torch.ones_like(t)), labels).tangent


def train_step(model: torch.nn.Module, z, v, r, t, labels, autocast: torch.dtype | None = None, split: bool = False) -> None:
    """One MeanFlow-style step: jvp, target under stop-gradient (float32), squared error, backward.

    ``split``: the jvp runs under no_grad and u comes from a second, ordinary forward (one more
    forward pass, but autograd stores no tangent intermediates).
    """
    if split:
        with torch.no_grad():
            _, dudt = jvp(model, z, v, r, t, labels, autocast)
        with torch.autocast("cuda", dtype=autocast) if autocast else nullcontext():
            u = model(z, r, t, labels)
    else:
        u, dudt = jvp(model, z, v, r, t, labels, autocast)
    target = v.float() - (t - r)[:, None, None, None] * dudt.float()
    (u.float() - target).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def median_ms(fn, steps: int) -> float:
    """Median milliseconds of fn() over `steps` runs after two warm-ups."""
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).abs().max() / ref.abs().max()).item()


def check_model(name: str, args, device, seen: Counter) -> bool:
    """Compare and time every backend for one model; print one row each. True when all pass."""
    base = build(name, device)
    inputs32 = make_inputs(base, args.batch, device)
    os.environ[attn.ENV_VAR] = "math"
    u_ref, dudt_ref = jvp(base, *inputs32)
    ok = True
    print(f"\n{name}: batch {args.batch}, |u|max {u_ref.abs().max():.3g}, |du/dt|max {dudt_ref.abs().max():.3g}")
    print(f"{'precision':<10}{'backend':<10}{'chosen':<12}{'err u':>10}{'err du/dt':>11}{'err dual':>10}{'step ms':>10}{'peak GiB':>10}  status")
    for precision in args.precisions:
        dtype, autocast, floor = PRECISIONS[precision]
        model = copy.deepcopy(base).to(dtype)
        z, v, r, t, labels = inputs32
        z, v = z.to(dtype), v.to(dtype)
        errors = {}
        for backend in reversed(BACKENDS):  # math first: it sets the bar for the others
            os.environ[attn.ENV_VAR] = backend
            seen.clear()
            with torch.no_grad():
                u, dudt = jvp(model, z, v, r, t, labels, autocast)
                dudt_dual = dual_jvp(model, z, v, r, t, labels, autocast)
            chosen = "+".join(sorted(seen))
            errors[backend] = (rel(u, u_ref), rel(dudt, dudt_ref), rel(dudt_dual, dudt_ref))
            limit = [max(2 * e, floor) for e in errors["math"][:2]]
            limit.append(limit[1])  # the Dual path answers to the same bar as forward-mode AD
            passed = all(e <= lim for e, lim in zip(errors[backend], limit))
            ok &= passed
            ms = median_ms(lambda: train_step(model, z, v, r, t, labels, autocast, args.split_jvp), args.steps)
            peak = torch.cuda.max_memory_allocated() / 2**30
            status = "ok" if passed else f"MISMATCH (limit {limit[0]:.1e}, {limit[1]:.1e})"
            print(
                f"{precision:<10}{backend:<10}{chosen:<12}{errors[backend][0]:>10.2e}{errors[backend][1]:>11.2e}{errors[backend][2]:>10.2e}"
                f"{ms:>10.1f}{peak:>10.1f}  {status}"
            )
        del model
        torch.cuda.empty_cache()
    return ok


def bench_attention(args, device) -> None:
    """Milliseconds of attention jvp + backward alone, per backend, token count and dtype."""
    print(f"\nattention alone: batch {args.batch}, 12 heads of 64, jvp + backward (ms)")
    print(f"{'dtype':<10}{'tokens':>7}" + "".join(f"{b:>11}" for b in ("math", "sdpa", "jvp_flash")))
    backends = ("math", "sdpa", "jvp_flash") if attn.jvp_flash_available() else ("math", "sdpa")
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (64, 256, 1024):
            shape = (args.batch, 12, tokens, 64)
            primals = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
            tangents = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]
            row = []
            for backend in backends:

                def step():
                    out, tangent = torch.func.jvp(lambda *x: attn.attention(*x, backend=backend), tuple(primals), tuple(tangents))
                    (out.float().pow(2).mean() + tangent.float().mean()).backward()

                row.append(median_ms(step, args.steps))
            print(f"{str(dtype)[6:]:<10}{tokens:>7}" + "".join(f"{ms:>11.2f}" for ms in row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--models", nargs="+", default=["dit-b/4", "unet-cifar10"], choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--split-jvp", action="store_true", help="time steps with a no_grad jvp plus a separate forward")
    parser.add_argument("--attention-bench", action=argparse.BooleanOptionalAction, default=True, help="time attention alone")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks: CUDA is not available; run this on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 reference
    torch.backends.cudnn.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, jvp-flash-attention available: {attn.jvp_flash_available()}")
    seen = record_backends()
    results = [check_model(name, args, device, seen) for name in args.models]
    if args.attention_bench:
        bench_attention(args, device)
    print("\nall backends agree with the math path" if all(results) else "\nFAILED: a backend disagrees with the math path")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
