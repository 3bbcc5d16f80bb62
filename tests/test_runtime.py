"""Runtime infrastructure: atomic publication of files and directories, RNG state round trips."""
from __future__ import annotations

import pytest
import torch

from meanflow.runtime.files import atomic_path
from meanflow.runtime.seeding import restore_rng_states, rng_states


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_directory_replaces_an_existing_one(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_rng_states_round_trip():
    torch.manual_seed(123)
    saved = rng_states()
    expected = torch.rand(5)
    torch.manual_seed(999)
    restore_rng_states(saved)
    assert torch.equal(torch.rand(5), expected)
    assert saved["rng_cuda"] == [] or len(saved["rng_cuda"]) == torch.cuda.device_count()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_rng_state_is_restored():
    torch.manual_seed(7)
    saved = rng_states()
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(1)
    restore_rng_states(saved)
    assert torch.equal(torch.rand(5, device="cuda"), expected)
