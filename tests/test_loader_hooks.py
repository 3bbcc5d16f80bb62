"""Data through a DataLoader: the same batches for any number of workers, exact resume with
workers; trainer hooks called where documented."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meanflow.config import load_config
from meanflow.data import load_dataset
from meanflow.data.loader import step_batches
from meanflow.runtime import checkpoint as ckpt
from meanflow.runtime.seeding import GlobalBatchOrder
from meanflow.training.hooks import Hooks
from meanflow.training.trainer import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A .npz of 40 uint8 8x8 RGB images with 2 classes."""
    path = tmp_path_factory.mktemp("npz") / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8), labels=rng.integers(0, 2, size=40))
    return path


def _cfg(images, *extra):
    return load_config("digits", ["data.name=npz", f"data.path={images}", "data.image_size=null", "data.flip=true",
                                  "model.kwargs={attn_resolutions: []}", "train.batch_size=8", "train.steps=6",
                                  "train.warmup_steps=0", "train.log_every=0", "train.sample_every=0",
                                  "train.checkpoint_every=3", "train.keep_checkpoints=5", *extra])


def test_loader_yields_the_global_order_for_any_number_of_workers(images):
    cfg = _cfg(images)
    data, _ = load_dataset(cfg.data, cfg.seed)
    order = GlobalBatchOrder(len(data), 8, seed=3)
    reference = [data.get(order.local_indices(step, 1, 2)) for step in range(2, 9)]  # crosses an epoch (5 steps)
    for workers in (0, 2):
        got = list(step_batches(data, order, 2, 9, rank=1, world_size=2, num_workers=workers))
        assert len(got) == len(reference)
        for (x, y), (x_ref, y_ref) in zip(got, reference):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.heavy
def test_num_workers_and_resume_with_workers_train_the_same_model(images, tmp_path):
    train(_cfg(images), tmp_path / "w0")
    train(_cfg(images, "train.num_workers=2"), tmp_path / "w2")
    train(_cfg(images, "train.num_workers=2", "train.steps=3"), tmp_path / "r")
    train(_cfg(images, "train.num_workers=2"), tmp_path / "r", resume=True)
    final = {name: load_file(str(ckpt.latest_checkpoint(tmp_path / name / "checkpoints") / "model.safetensors"))
             for name in ("w0", "w2", "r")}
    assert ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints").name == ckpt.checkpoint_name(6)
    for name in ("w2", "r"):
        assert final[name].keys() == final["w0"].keys()
        assert all(torch.equal(final[name][k], final["w0"][k]) for k in final["w0"]), name


class Recorder(Hooks):
    def __init__(self):
        self.calls = []

    def after_step(self, step, stats, model):
        self.calls.append(("step", step, round(stats["loss"], 6), model.training))

    def at_checkpoint(self, step, path):
        self.calls.append(("checkpoint", step, path.name))

    def at_evaluation(self, step, model, data):
        self.calls.append(("evaluation", step, model.training, len(data)))


def test_hooks_are_called_after_steps_at_checkpoints_and_evaluations(images, tmp_path):
    recorder = Recorder()
    train(_cfg(images, "train.steps=4", "train.checkpoint_every=2", "train.sample_every=4"), tmp_path / "run", hooks=[recorder])
    kinds = [(call[0], call[1]) for call in recorder.calls]
    assert kinds == [("step", 1), ("step", 2), ("checkpoint", 2), ("step", 3), ("step", 4), ("evaluation", 4), ("checkpoint", 4)]
    assert recorder.calls[2][2] == ckpt.checkpoint_name(2) and recorder.calls[5][2:] == (False, 40)
    assert all(call[3] for call in recorder.calls if call[0] == "step")  # the raw model, in training mode
    assert (tmp_path / "run" / "samples" / "step_00000004.png").is_file()  # the evaluation hook runs after the previews
