import os
import socket

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MEANFLOW_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "meanflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_TOY = (
    "model.kwargs={width: 32, depth: 2}", "data.num_samples=2048", "data.holdout=256",
    "train.batch_size=64", "train.log_every=10", "train.warmup_steps=0", "eval.num_samples=256",
    "train.device=cpu",  # the multi-process tests compare with gloo on the CPU, also on a machine with GPUs
)


@pytest.fixture
def tiny_toy_overrides():
    """Overrides that make the toy preset train in seconds (:data:`TINY_TOY`, a fresh list per test)."""
    return list(TINY_TOY)
