"""Cost of one MeanFlow training step against Flow Matching, and of 1-NFE sampling.

    python benchmarks/bench_step.py --device cpu [--check] [--json out.json]
    python benchmarks/bench_step.py --device cpu --preset plain --threads 2   # a user's plain-PyTorch DiT
    python benchmarks/bench_step.py --device cpu --preset checkpoint   # that DiT with and without activation checkpointing
    python benchmarks/bench_step.py --device cuda --preset gpu --json bench_gpu.json [--amp bf16] [--compile]
    python benchmarks/bench_step.py --device cuda --preset gpu-rows --amp bf16 [--compile]   # the row tangent at DiT-B/XL shapes
    python benchmarks/bench_step.py --device cpu --preset engines [--compile]   # row tangent against Dual on our models

For every case (model preset, input shape, batch, attention backend) one model, one optimizer and
one data batch are built, and these train steps (loss, backward, Adam step) run in rounds, each
round in a fresh random order, after a warmup, so machine load hits every variant alike:

* ``fm``: Flow Matching (``FlowMatchingLoss``), the reference;
* ``mf25`` / ``mf75``: our MeanFlow step with 25% / 75% of the batch at r != t (``jvp="auto"``:
  one forward pass on Dual values for our models);
* ``mf25_rows`` / ``mf75_rows``: the same with ``jvp="rows"`` (one plain forward pass while
  :func:`meanflow.autodiff.rows.row_jvp` carries the r != t rows' tangent: what ``auto`` picks for
  models without Dual support, such as the plain DiT of ``plain_dit.py``, preset ``plain``);
* ``mf25_fwad`` / ``mf75_fwad``: the same loss with forward-mode AD on the r != t rows
  (``jvp="forward_ad"``: ``torch.func.jvp`` on a compiled model);
* ``mf_full``: the same loss with forward-mode AD over the whole batch (``jvp="full"``, 25% r != t);
* ``public``: the public-implementation baseline written below (:class:`PublicReferenceLoss`,
  25% r != t): u with gradient from a forward pass, the JVP again in a separate no-grad call.

With ``--compile`` the model is also wrapped by ``torch.compile`` and the requested variants among
``fm``, ``mf25``, ``mf75``, the ``_rows`` and ``_fwad`` ones run on it too (suffix ``+compile``), after
checking that compiled du/dt equals eager du/dt; their time ratios are to ``fm+compile``.

Reported per variant: median wall time, the median over rounds of its time divided by ``fm``'s
time in the same round, and the peak memory the step adds on top of the resting state (model,
optimizer state, batch): CUDA ``max_memory_allocated``; on the CPU the peak resident-set growth
of a fresh subprocess that runs only that variant (glibc told to return freed blocks to the OS).
Sampling: ``meanflow.sample(steps=1)`` against a bare no-grad forward pass, images per second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow import FlowMatchingLoss, MeanFlowLoss, sample
from meanflow.models import create
from meanflow.models.attention import ENV_VAR, jvp_flash_available
from meanflow.objectives import conditional_velocity, interpolate
from plain_dit import PlainDiT

Step = Callable[[int], None]


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a model preset on (batch, channels, size, size) inputs; size 0: (batch, channels) points."""

    model: str
    channels: int
    size: int
    batch: int
    num_classes: int = 0
    attention: str | None = None

    @property
    def name(self) -> str:
        backend = self.attention or os.environ.get(ENV_VAR, "auto")
        shape = f"{self.size}x{self.size}x{self.channels}" if self.size else f"{self.channels}-d points"
        return f"{self.model} {shape} b{self.batch} attn={backend}"


PRESETS = {
    "cpu": (Case("dit-tiny/2", 4, 16, 64, 10), Case("unet-tiny", 3, 16, 64)),
    "gpu": (Case("dit-b/4", 4, 32, 256, 1000), Case("unet-cifar10", 3, 32, 128)),
    # a user's DiT (benchmarks/plain_dit.py, the size of dit-tiny/2) with SDPA or spelled-out attention, and ours
    "plain": (Case("plain-dit", 4, 16, 64, 10), Case("plain-dit-math", 4, 16, 64, 10), Case("dit-tiny/2", 4, 16, 64, 10)),
    # the same DiT with torch.utils.checkpoint around each block (recomputed in backward) and without
    "checkpoint": (Case("plain-dit", 4, 16, 64, 10), Case("plain-dit-ckpt", 4, 16, 64, 10)),
    # the row tangent on a GPU: the plain DiT at the shapes of DiT-B/4, DiT-B/2 and DiT-XL/2 on 32x32x4 latents
    "gpu-rows": (Case("plain-dit-b/4", 4, 32, 256, 1000), Case("plain-dit-b/2", 4, 32, 256, 1000),
                 Case("plain-dit-xl/2", 4, 32, 64, 1000)),
    # the two tangent engines (Dual layers: mf25/mf75; row tangent: mf25_rows/mf75_rows) on each of our model families
    "engines": (Case("dit-tiny/2", 4, 16, 64, 10), Case("unet-tiny", 3, 16, 64), Case("mlp", 2, 0, 1024),
                Case("imf-tiny/2", 4, 16, 64, 10)),
}
# plain-PyTorch models (not in the library's registry): name -> PlainDiT options
PLAIN_MODELS = {
    "plain-dit": dict(fused=True), "plain-dit-math": dict(fused=False), "plain-dit-ckpt": dict(fused=True, checkpoint=True),
    "plain-dit-b/4": dict(dim=768, depth=12, heads=12, patch=4), "plain-dit-b/2": dict(dim=768, depth=12, heads=12, patch=2),
    "plain-dit-xl/2": dict(dim=1152, depth=28, heads=16, patch=2),
}
# --check: ratios to the Flow Matching step on the first (DiT) case.
TARGETS = {"mf25_time": 1.12, "mf75_time": 1.40, "memory": 1.05, "sampling": 0.95}


class PublicReferenceLoss:
    """PUBLIC-IMPLEMENTATION BASELINE, not this library's loss; kept here only to be timed.

    What public MeanFlow ports do: u = model(z, r, t) with gradient, then the JVP over the whole
    batch in a separate ``torch.no_grad()`` call that recomputes the primal output, only to build
    the target. Same draws and adaptive weight as :class:`MeanFlowLoss`; one extra forward pass.
    """

    def __init__(self, ratio: float = 0.25, weight_power: float = 1.0, weight_eps: float = 1e-3):
        self.draws = MeanFlowLoss(ratio=ratio)
        self.weight_power, self.weight_eps = weight_power, weight_eps

    def __call__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, *, generator=None):
        """Scalar loss for a batch x (B, ...) and an empty stats dict."""
        d = self.draws.draw(x, generator)
        if labels is not None:
            labels = torch.where(d.dropped, torch.full_like(labels, model.num_classes), labels)
        z, v = interpolate(x, d.noise, d.t), conditional_velocity(x, d.noise)  # (B, ...)
        u = model(z, d.r, d.t, labels)  # (B, ...) with gradient
        with torch.no_grad():
            fn = lambda z_, r_, t_: model(z_, r_, t_, labels)  # noqa: E731
            _, dudt = torch.func.jvp(fn, (z, d.r, d.t), (v, torch.zeros_like(d.r), torch.ones_like(d.t)))
        h = (d.t - d.r).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
        target = v.float() - h * dudt.float()  # (B, ...)
        err = (u.float() - target).pow(2).flatten(1).sum(1)  # (B,)
        w = 1.0 / (err.detach() + self.weight_eps).pow(self.weight_power)
        return (w * err).mean(), {}


LOSSES: dict[str, Callable[[], Callable]] = {
    "fm": FlowMatchingLoss,
    "mf25": lambda: MeanFlowLoss(ratio=0.25),
    "mf75": lambda: MeanFlowLoss(ratio=0.75),
    "mf25_rows": lambda: MeanFlowLoss(ratio=0.25, jvp="rows"),
    "mf75_rows": lambda: MeanFlowLoss(ratio=0.75, jvp="rows"),
    "mf25_fwad": lambda: MeanFlowLoss(ratio=0.25, jvp="forward_ad"),
    "mf75_fwad": lambda: MeanFlowLoss(ratio=0.75, jvp="forward_ad"),
    "mf_full": lambda: MeanFlowLoss(ratio=0.25, jvp="full"),
    "public": lambda: PublicReferenceLoss(ratio=0.25),
}
COMPILED = ("fm", "mf25", "mf75", "mf25_rows", "mf75_rows", "mf25_fwad", "mf75_fwad")
# variants that call torch.func.jvp themselves, so choose SDPA's math kernel (the fused ones have no forward-mode
# rule; the library's forward-AD modes choose it on their own)
FORWARD_AD = ("public",)


def autocast(device: str, amp: str):
    """bf16 autocast context for ``--amp bf16``, else a no-op."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(case: Case, device: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor | None]:
    """Model (zero-initialised layers perturbed so u and du/dt are non-trivial), Adam, batch x (B, C, H, W) or
    (B, C) points, labels (B,)."""
    torch.manual_seed(seed)
    if case.model in PLAIN_MODELS:
        model = PlainDiT(case.channels, case.size, num_classes=case.num_classes, **PLAIN_MODELS[case.model]).to(device)
    elif not case.size:
        model = create(case.model, dim=case.channels, num_classes=case.num_classes).to(device)
    else:
        model = create(
            case.model, in_channels=case.channels, input_size=case.size, num_classes=case.num_classes, attention_backend=case.attention
        ).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(case.batch, case.channels, *([case.size] * 2 if case.size else []), device=device)
    labels = torch.randint(0, case.num_classes, (case.batch,), device=device) if case.num_classes else None
    return model, optimizer, x, labels


def train_step(loss_fn, model, optimizer, x, labels, seed: int, device: str, amp: str) -> None:
    """Loss, backward and optimizer step; gradients are freed afterwards (resting state has none)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(device, amp):
        loss, _ = loss_fn(model, x, labels, generator=generator)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_fns(names, model, compiled, optimizer, x, labels, device: str, amp: str) -> dict[str, Step]:
    """name -> step(seed) for every requested variant (``name+compile`` runs on the compiled model)."""
    steps = {}
    for name in names:
        base, _, suffix = name.partition("+")
        loss_fn, net = LOSSES[base](), compiled if suffix else model
        kernels = (lambda: sdpa_kernel(SDPBackend.MATH)) if base in FORWARD_AD else nullcontext
        steps[name] = lambda seed, f=loss_fn, n=net, k=kernels: _under(k(), train_step, f, n, optimizer, x, labels, seed, device, amp)
    return steps


def _under(context, fn, *args) -> None:
    """fn(*args) inside a context manager."""
    with context:
        fn(*args)


def interleave(steps: dict[str, Step], warmup: int, repeats: int, device: str = "cpu",
               clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every step, each round in a fresh random order (seeded), after ``warmup`` rounds.

    Shuffling keeps what one variant leaves behind (allocator state, caches) from always landing
    on the same next variant. ``clock``: wall time by default; ``time.process_time`` counts only
    this process's CPU time (one thread: other jobs on the machine do not count).
    """
    for i in range(warmup):
        for step in steps.values():
            step(i)
    names, times = list(steps), {name: [] for name in steps}
    for i in range(repeats):
        for name in random.Random(i).sample(names, len(names)):
            synchronize(device)
            start = clock()
            steps[name](warmup + i)
            synchronize(device)
            times[name].append(clock() - start)
    return times


def summarise(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Median ms and the median of same-round time ratios to ``reference``, per name.

    A ``name+compile`` variant is compared with ``reference+compile`` when that ran (compiled with compiled).
    """
    def ref(name: str) -> list[float]:
        compiled = f"{reference}+compile"
        return times[compiled] if name.endswith("+compile") and compiled in times else times[reference]

    return {
        name: {
            "median_ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(t / r for t, r in zip(ts, ref(name))),
        }
        for name, ts in times.items()
    }


def cuda_peak_mib(step: Step, seed: int) -> float:
    """Peak CUDA memory (MiB) the step allocates above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(seed)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def rss_peak_mib(step: Step, seeds: range) -> float:
    """Largest peak resident-set growth (MiB) over one call of the step per seed (Linux)."""
    growth = []
    for seed in seeds:
        before = _proc_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
        step(seed)
        growth.append(_proc_kib("VmHWM") - before)
    return max(growth) / 1024


def cpu_peak_mib(case: Case, name: str, amp: str, threads: int) -> float | None:
    """Run :func:`rss_peak_mib` for one variant in a fresh subprocess; None where it cannot run."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    probe = json.dumps({"case": asdict(case), "variant": name, "amp": amp, "threads": threads})
    done = subprocess.run([sys.executable, __file__, "--probe", probe], env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"memory probe for {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def run_probe(spec: str) -> None:
    """Subprocess entry point of :func:`cpu_peak_mib`: prints the peak growth in MiB."""
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    model, optimizer, x, labels = build(case, "cpu")
    step = step_fns([spec["variant"]], model, None, optimizer, x, labels, "cpu", spec["amp"])[spec["variant"]]
    for seed in range(2):
        step(seed)
    print(rss_peak_mib(step, range(2, 5)))


def check_compiled(model: nn.Module, compiled: nn.Module, x: torch.Tensor, labels, device: str, amp: str) -> float:
    """Max |du/dt compiled - du/dt eager| / max |du/dt eager| on 75% r != t (eval mode: no dropout)."""
    loss_fn, outs = MeanFlowLoss(ratio=0.75), []
    model.eval()
    for net in (model, compiled):
        with autocast(device, amp):
            outs.append(loss_fn.targets(net, x, labels, generator=torch.Generator(device=device).manual_seed(0)).dudt)
    model.train()
    return float((outs[1] - outs[0]).abs().max() / outs[0].abs().max().clamp_min(1e-12))


def check_exact(model: nn.Module, x: torch.Tensor, labels, device: str) -> float:
    """Max |du/dt of MeanFlowLoss - du/dt of torch.func.jvp| / max |du/dt| on the r != t samples (eval mode)."""
    out = MeanFlowLoss(ratio=0.75).targets(model.eval(), x, labels, generator=torch.Generator(device=device).manual_seed(0))
    d, mf = out.draws, out.draws.jvp_index
    fn = lambda z_, r_, t_: model(z_, r_, t_, None if out.labels is None else out.labels[mf])  # noqa: E731
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, dudt = torch.func.jvp(fn, (out.z[mf], d.r[mf], d.t[mf]), (out.v[mf], torch.zeros_like(d.r[mf]), torch.ones_like(d.t[mf])))
    model.train()
    return float((out.dudt[mf] - dudt).abs().max() / dudt.abs().max().clamp_min(1e-12))


def sampling(model: nn.Module, x: torch.Tensor, labels, device: str, amp: str, warmup: int, repeats: int) -> dict:
    """Images per second of ``sample(steps=1)`` and of a bare no-grad forward (eval mode)."""
    ones = torch.ones(x.shape[0], device=device)

    def one_nfe(_: int) -> None:
        with autocast(device, amp):
            sample(model, x, steps=1, labels=labels)

    def forward(_: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            model(x, 0 * ones, ones, labels)

    model.eval()
    times = interleave({"forward": forward, "sample_1nfe": one_nfe}, warmup, repeats, device)
    model.train()
    result = summarise(times, "forward")
    for value in result.values():
        value["images_per_s"] = 1e3 * x.shape[0] / value["median_ms"]
        value["throughput_ratio"] = 1.0 / value.pop("ratio")
    return result


def run_case(case: Case, args) -> dict:
    """Time, memory and sampling results of one case."""
    model, optimizer, x, labels = build(case, args.device)
    names = ["fm", *[v for v in args.variants.split(",") if v != "fm"]] if args.variants else list(LOSSES)
    result = {"case": asdict(case), "name": case.name}
    result["dudt_rel_error_vs_torch_func_jvp"] = check_exact(model, x, labels, args.device)
    compiled = None
    if args.compile:
        compiled = torch.compile(model)
        try:
            error = check_compiled(model, compiled, x, labels, args.device, args.amp)
        except (RuntimeError, NotImplementedError) as failure:
            error, result["compile_failure"] = float("inf"), repr(failure)[:500]
        tolerance = 5e-2 if args.amp == "bf16" else 1e-3
        result["compile_dudt_rel_error"] = error
        if error <= tolerance:
            names += [f"{name}+compile" for name in names if name in COMPILED]
        else:
            print(f"[{case.name}] compiled du/dt differs from eager (relative error {error:.2e}): not timing compile", file=sys.stderr)
    steps = step_fns(names, model, compiled, optimizer, x, labels, args.device, args.amp)
    train = summarise(interleave(steps, args.warmup, args.repeats, args.device), "fm")
    for name, value in train.items():
        if args.device == "cuda":
            value["peak_mib"] = cuda_peak_mib(steps[name], 10**6)
        else:
            value["peak_mib"] = None if "+" in name else cpu_peak_mib(case, name, args.amp, torch.get_num_threads())
    fm_peak = train["fm"]["peak_mib"]
    for value in train.values():
        value["peak_ratio"] = value["peak_mib"] / fm_peak if value["peak_mib"] and fm_peak else None
    result["train"] = train
    result["sampling"] = sampling(model, x, labels, args.device, args.amp, args.warmup, args.repeats)
    return result


def environment(args) -> dict:
    """Machine and software description stored with the results."""
    cpu = platform.processor()
    try:
        cpu = re.search(r"Model name:\s+(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "jvp_flash_available": jvp_flash_available(),
        "args": vars(args),
    }


def cases_for(args) -> list[Case]:
    """The preset's cases, with --batch and the attention backends (--attention, or per preset) applied."""
    backends: list[str | None]
    if args.attention:
        backends = args.attention.split(",")
    elif args.preset == "gpu" and ENV_VAR not in os.environ:
        backends = ["sdpa"] + (["jvp_flash"] if jvp_flash_available() else [])
    else:
        backends = [None]
    cases = []
    for case in PRESETS[args.preset]:
        if args.models and case.model not in args.models.split(","):
            continue
        for backend in backends:
            cases.append(Case(case.model, case.channels, case.size, args.batch or case.batch, case.num_classes, backend))
    return cases


def print_case(result: dict) -> None:
    print(f"\n== {result['name']}   (du/dt vs torch.func.jvp: relative error {result['dudt_rel_error_vs_torch_func_jvp']:.1e})")
    print(f"{'variant':<16}{'median ms':>11}{'x FM':>8}{'img/s':>9}{'peak MiB':>11}{'x FM':>8}")
    for name, v in result["train"].items():
        peak = f"{v['peak_mib']:11.1f}" if v["peak_mib"] is not None else f"{'-':>11}"
        ratio = f"{v['peak_ratio']:8.2f}" if v["peak_ratio"] is not None else f"{'-':>8}"
        images = result["case"]["batch"] / (v["median_ms"] / 1000)  # training images per second
        print(f"{name:<16}{v['median_ms']:11.1f}{v['ratio']:8.3f}{images:9.0f}{peak}{ratio}")
    for name, v in result["sampling"].items():
        print(f"{name:<16}{v['median_ms']:11.2f} ms  {v['images_per_s']:10.0f} img/s  x forward {v['throughput_ratio']:.3f}")


def check(results: list[dict]) -> list[str]:
    """Targets missed on the first DiT case, as messages (empty: all met)."""
    dit = next((r for r in results if "dit" in r["case"]["model"]), None)
    if dit is None:
        return ["--check needs a DiT case"]
    train, missed = dit["train"], []
    for name, key in (("mf25", "mf25_time"), ("mf75", "mf75_time")):
        if train[name]["ratio"] > TARGETS[key]:
            missed.append(f"{name} step takes {train[name]['ratio']:.3f}x the FM step (target <= {TARGETS[key]})")
        peak = train[name]["peak_ratio"]
        if peak is not None and peak > TARGETS["memory"]:
            missed.append(f"{name} peak memory is {peak:.2f}x the FM step's (target <= {TARGETS['memory']})")
    throughput = dit["sampling"]["sample_1nfe"]["throughput_ratio"]
    if throughput < TARGETS["sampling"]:
        missed.append(f"1-NFE sampling runs at {throughput:.3f}x a bare forward (target >= {TARGETS['sampling']})")
    return missed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help="case list (default: the device's)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    parser.add_argument("--batch", type=int, default=None, help="override the preset batch size")
    parser.add_argument("--attention", default=None, help=f"comma-separated backends (default: ${ENV_VAR}; GPU: sdpa and jvp_flash)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(LOSSES)} (fm always)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (du/dt checked first)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on --device cpu: 1, robust to shared cores)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("gpu" if args.device == "cuda" else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        run_probe(args.probe)
        return 0
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results = []
    for case in cases_for(args):
        results.append(run_case(case, args))
        print_case(results[-1])
    report = {"environment": environment(args), "targets": TARGETS, "results": results}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.check:
        missed = check(results)
        for message in missed:
            print(f"MISSED: {message}", file=sys.stderr)
        return 1 if missed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
