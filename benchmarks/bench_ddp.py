"""Gradient all-reduce overlapped with the backward pass (DistributedDataParallel) against the explicit one,
and FSDP2 sharding (what ``train.parallel=fsdp`` does) beside them.

    python benchmarks/bench_ddp.py [--model plain-dit] [--batch 64] [--repeats 11] [--json out.json]

Two gloo processes on the CPU (one thread each) train the same model on halves of one global
batch with ``MeanFlowLoss(ratio=0.25)`` (``jvp="auto"``: the one-pass tangent, so the loss runs
one forward pass with gradients and DDP can wrap the model). Per round, each variant takes one
step (loss, backward, gradients averaged over the two ranks), in alternating order, after a
barrier; rank 0 reports the median time of each variant and the median of the per-round ratio:

* ``explicit``: plain module, then ``meanflow.runtime.distributed.all_reduce_gradients`` (one
  flat all-reduce after the backward pass: what forward-mode AD requires);
* ``ddp``: ``DistributedDataParallel`` (bucketed all-reduces launched while the backward pass
  still runs);
* ``fsdp``: ``meanflow.runtime.distributed.shard_model`` (FSDP2: every block of the model's
  ModuleLists and the root; parameters all-gathered per block, gradients reduce-scattered).

All variants are checked to give the same averaged gradients first; the report also gives the
parameter and gradient bytes each rank holds (FSDP2 holds its shard: about 1 / world of them).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from meanflow import MeanFlowLoss
from meanflow.models import create
from meanflow.objectives import Shard
from meanflow.runtime.distributed import all_reduce_gradients, is_dtensor, shard_model
from plain_dit import PlainDiT


def build(name: str) -> torch.nn.Module:
    """The model, with the same random weights on every rank (zero-initialised layers perturbed)."""
    torch.manual_seed(0)
    model = PlainDiT(4, 16, num_classes=10) if name == "plain-dit" else create(name, in_channels=4, input_size=16, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def step(module, params, x, labels, rank: int, world: int, seed: int, explicit: bool) -> list[torch.Tensor]:
    """One loss + backward on this rank's half of the global batch; the averaged gradients."""
    local = x.shape[0] // world
    part = slice(rank * local, (rank + 1) * local)
    loss, _ = MeanFlowLoss(ratio=0.25)(module, x[part], labels[part], generator=torch.Generator().manual_seed(seed),
                                       shard=Shard(rank * local, x.shape[0]))
    loss.backward()
    if explicit:
        all_reduce_gradients(module, world)
    grads = [p.grad.full_tensor() if is_dtensor(p.grad) else p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def held_bytes(params: list[torch.Tensor]) -> int:
    """Bytes of parameters plus their gradients (each as large as its parameter) that this rank stores: the local
    shard of a DTensor."""
    return 2 * sum((p.to_local() if is_dtensor(p) else p).nbytes for p in params)


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    x, labels = torch.randn(args.batch, 4, 16, 16), torch.randint(0, 10, (args.batch,))
    plain, wrapped, sharded = build(args.model), build(args.model), build(args.model)
    ddp = DistributedDataParallel(wrapped, forward_sync_buffers=False)
    shard_model(sharded)
    params = {"explicit": list(plain.parameters()), "ddp": list(wrapped.parameters()), "fsdp": list(sharded.parameters())}
    variants = {
        "explicit": lambda seed: step(plain, params["explicit"], x, labels, rank, world, seed, True),
        "ddp": lambda seed: step(ddp, params["ddp"], x, labels, rank, world, seed, False),
        "fsdp": lambda seed: step(sharded, params["fsdp"], x, labels, rank, world, seed, False),
    }
    first = {name: fn(0) for name, fn in variants.items()}
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for name in ("ddp", "fsdp") for a, b in zip(first["explicit"], first[name]))
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name in (list(variants) if i % 2 else list(variants)[::-1]):  # alternate the order round by round
            dist.barrier()
            start = time.perf_counter()
            variants[name](i + 1)
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        report = {
            "model": args.model, "global_batch": args.batch, "world_size": world, "torch": torch.__version__,
            "gradients_equal": same,
            "median_ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
            "ddp_over_explicit": statistics.median(d / e for d, e in zip(times["ddp"], times["explicit"])),
            "fsdp_over_explicit": statistics.median(f / e for f, e in zip(times["fsdp"], times["explicit"])),
            "held_mib_per_rank": {name: held_bytes(ps) / 2**20 for name, ps in params.items()},
        }
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="plain-dit", help="plain-dit (benchmarks/plain_dit.py) or a registry preset")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the 2 processes)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, args), nprocs=2, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
