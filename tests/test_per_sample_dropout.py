"""Dropout drawn per global sample: the same model whatever the number of processes.

In-process checks of :mod:`meanflow.autodiff.per_sample` (the mask of a row depends on its global
index only; every JVP mode and every split of the batch gives the same loss and gradients; RNG
replays such as activation checkpointing see the same mask), then one process against two gloo
processes training with dropout, horizontal flips and class labels.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from meanflow import MeanFlowLoss
from meanflow.models import create
from meanflow.objectives import Shard
from meanflow.runtime import checkpoint as ckpt
from meanflow.autodiff.per_sample import PerSampleDropout, model_rows, uniform

from conftest import free_port


def test_uniform_values_are_per_row_and_uniform():
    key = torch.tensor([12345, 678], dtype=torch.long)
    many = uniform(key, torch.arange(200), (50, 10))  # (200, 50, 10)
    torch.testing.assert_close(uniform(key, torch.tensor([17, 3]), (50, 10)), many[[17, 3]], rtol=0, atol=0)
    values = many.flatten().double()
    assert float(values.min()) >= 0 and float(values.max()) < 1
    assert abs(float(values.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / values.numel() ** 0.5
    assert abs(float(values.var()) - 1 / 12) < 0.002
    # neighbouring rows and elements are uncorrelated
    flat = many.reshape(200, -1).double() - 0.5
    assert abs(float((flat[1:] * flat[:-1]).mean())) < 0.003 and abs(float((flat[:, 1:] * flat[:, :-1]).mean())) < 0.003
    assert not torch.equal(uniform(key + 1, torch.arange(3), (4,)), uniform(key, torch.arange(3), (4,)))
    # every pair of rows uncorrelated over 2000 elements: under independence the largest of the 19900 sample
    # correlations is about 4.3 standard deviations (0.022 each), so 0.15 leaves room and catches structure
    rows = uniform(key, torch.arange(200), (2000,)).double()
    assert float((torch.corrcoef(rows) - torch.eye(200)).abs().max()) < 0.15


class Dropouts(nn.Module):
    """Element-wise dropout (module and in-place functional) and channel dropout on (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = F.dropout(self.drop(x), 0.5, self.training, inplace=True)
        return F.dropout2d(y, 0.4, self.training)


def test_masks_depend_on_the_global_row_only():
    net, x = Dropouts(), torch.ones(8, 3, 4, 4)
    with PerSampleDropout(3, torch.arange(8), 8):
        whole = net(x.clone())
    halves = []
    for k in range(2):
        with PerSampleDropout(3, torch.arange(4 * k, 4 * k + 4), 8):
            halves.append(net(x[4 * k:4 * k + 4].clone()))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    with PerSampleDropout(3, torch.arange(8), 8), model_rows(torch.tensor([5, 2])):
        torch.testing.assert_close(net(x[[5, 2]].clone()), whole[[5, 2]], rtol=0, atol=0)
    with PerSampleDropout(4, torch.arange(8), 8):
        assert not torch.equal(net(x.clone()), whole), "another step, other masks"
    # the expected dropout: the kept fraction and the 1 / (1 - p) scale of each layer
    kept_values = whole[whole != 0]
    torch.testing.assert_close(kept_values, torch.full_like(kept_values, 1 / (0.7 * 0.5 * 0.6)))
    kept = float((whole > 0).double().mean())
    assert abs(kept - 0.7 * 0.5 * 0.6) < 0.08
    # channel dropout: a channel is dropped whole
    with PerSampleDropout(3, torch.arange(8), 8):
        maps = F.dropout2d(torch.ones(8, 6, 5, 5), 0.5, True)
    assert bool((maps.amax((2, 3)) == maps.amin((2, 3))).all())
    net.eval()
    with PerSampleDropout(3, torch.arange(8), 8):
        torch.testing.assert_close(net(x.clone()), x)


class StackedCopies(nn.Module):
    """The batch stacked twice along the first dimension (as the guided targets stack (z, z)) through one dropout,
    then two stacked dropout layers of the same kind."""

    def __init__(self):
        super().__init__()
        self.twice = nn.Dropout(0.5)
        self.layers = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))

    def forward(self, x):
        return self.twice(torch.cat([x, x])), self.layers(x)


def test_stacked_copies_of_the_batch_and_of_a_layer_get_their_own_masks_whatever_the_split():
    """Copy c of global row g is sample g + c * total (the global batch size, not the local one): each copy has
    its own mask, and the masks of a split batch are those of the whole. Two dropout layers draw two masks."""
    net, x, total = StackedCopies(), torch.ones(8, 512), 8
    with PerSampleDropout(3, torch.arange(8), total):
        stacked, layered = net(x)
    for k in range(2):
        rows = torch.arange(4 * k, 4 * k + 4)
        with PerSampleDropout(3, rows, total):
            half, half_layered = net(x[rows])
        torch.testing.assert_close(half, stacked[torch.cat([rows, rows + total])], rtol=0, atol=0)
        torch.testing.assert_close(half_layered, layered[rows], rtol=0, atol=0)
    first, second = (stacked[:8] > 0), (stacked[8:] > 0)
    assert abs(float((first & second).double().mean()) - 0.25) < 0.03, "the two copies' masks are independent"
    # the second copy's mask is the one a batch of 2 * total rows would get at its rows total..2 total - 1
    with PerSampleDropout(3, torch.arange(16), 16):
        alone = net.twice(x.repeat(2, 1))
    torch.testing.assert_close(stacked, alone, rtol=0, atol=0)
    assert abs(float((layered > 0).double().mean()) - 0.25) < 0.03, "two layers, two independent masks: (1 - p)^2 kept"


def test_every_jvp_mode_and_every_split_give_the_same_loss_with_dropout():
    torch.manual_seed(0)
    model = create("mlp", dim=2, width=32, depth=2, num_classes=3, dropout=0.3)
    x, labels = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3

    def run(jvp: str, shards: int) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        total, size = 0.0, 16 // shards
        for k in range(shards):
            part = slice(k * size, (k + 1) * size)
            with PerSampleDropout(72, torch.arange(16)[part], 16):
                loss, _ = MeanFlowLoss(ratio=0.5, jvp=jvp, omega=1.5)(
                    model, x[part], labels[part], generator=torch.Generator().manual_seed(3), shard=Shard(k * size, 16))
            (loss / shards).backward()
            total += loss.item() / shards
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    reference_loss, reference_grad = run("full", 1)
    for jvp, shards in (("dual", 1), ("forward_ad", 1), ("dual", 2), ("forward_ad", 4)):
        loss, grad = run(jvp, shards)
        assert loss == pytest.approx(reference_loss, rel=1e-6), (jvp, shards)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)
    without_dropout = create("mlp", dim=2, width=32, depth=2, num_classes=3)
    without_dropout.load_state_dict(model.state_dict())
    with PerSampleDropout(72, torch.arange(16), 16):
        plain, _ = MeanFlowLoss(ratio=0.5, omega=1.5)(without_dropout, x, labels, generator=torch.Generator().manual_seed(3))
    plain.backward()
    plain_grad = torch.cat([p.grad.flatten() for p in without_dropout.parameters()])
    # the adaptive weight normalises the loss to about 1 either way: the gradients show that dropout acted
    assert (plain_grad - reference_grad).abs().max() > 0.1 * reference_grad.abs().max(), "dropout must be active above"


def test_a_replay_by_generator_state_gets_the_same_mask():
    """The pattern of a recomputation (activation checkpointing): draw, restore the default generator, draw again."""
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    with PerSampleDropout(11, torch.arange(6), 6):
        state = torch.get_rng_state()
        out = F.dropout(x, 0.5, True)
        torch.set_rng_state(state)
        scale = F.dropout(torch.ones_like(x), 0.5, True)
        again = F.dropout(x, 0.5, True)
    torch.testing.assert_close(out, x * scale, rtol=0, atol=0)
    assert not torch.equal(again, out), "a second dropout call of the same forward draws a new mask"


def test_row_tangents_share_the_per_sample_mask():
    """The row-subset JVP (autodiff.rows) draws each dropout mask once, on ones: its tangent gets the same per-sample
    mask as the primal, so it equals forward-mode AD of the same masked function."""
    import torch.autograd.forward_ad as fwAD

    from meanflow.autodiff.rows import row_jvp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.4), nn.Tanh(), nn.Linear(16, 2))
    x, dx = torch.randn(8, 3), torch.randn(3, 3)
    with PerSampleDropout(29, torch.arange(8), 8):
        with model_rows(None):
            out, tangent = row_jvp(net, (x,), (dx,))
        with model_rows(None), fwAD.dual_level():
            dual = net(fwAD.make_dual(x, torch.cat([dx, torch.zeros(5, 3)])))
            primal, reference = fwAD.unpack_dual(dual)
    torch.testing.assert_close(out, primal, rtol=0, atol=0)
    torch.testing.assert_close(tangent, reference[:3], rtol=1e-6, atol=1e-6)


def test_a_dropout_that_does_not_see_the_batch_first_is_an_error():
    with PerSampleDropout(0, torch.arange(4), 4), pytest.raises(RuntimeError, match="batch as the first dimension"):
        F.dropout(torch.ones(3, 4), 0.1, True)
    with PerSampleDropout(0, torch.arange(4), 4), pytest.raises(NotImplementedError, match="alpha_dropout"):
        F.alpha_dropout(torch.ones(4, 2), 0.1, True)


class CheckpointedPoints(nn.Module):
    """A user's point model: one residual block with dropout, under activation checkpointing."""

    num_classes = 0

    def __init__(self, dim: int = 2, width: int = 32, dropout: float = 0.2, num_classes: int = 0):
        super().__init__()
        self.inp, self.out = nn.Linear(dim + 2, width), nn.Linear(width, dim)
        self.block = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout))

    def forward(self, z, r, t, labels=None):
        h = self.inp(torch.cat([z, r[:, None], t[:, None]], dim=1))
        h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        return self.out(h)


def test_dropout_inside_activation_checkpointing_is_refused():
    """Its recomputation in backward would draw another mask: an error in the forward pass; without dropout, no error."""
    x = torch.randn(8, 2)
    for dropout in (0.2, 0.0):
        model = CheckpointedPoints(dropout=dropout).train()
        with PerSampleDropout(1, torch.arange(8), 8):
            if dropout:
                with pytest.raises(RuntimeError, match="inside activation checkpointing.*Set the model's dropout to 0"):
                    model(x, torch.zeros(8), torch.ones(8))
            else:
                model(x, torch.zeros(8), torch.ones(8)).square().sum().backward()


def test_training_refuses_checkpointed_dropout(tmp_path, tiny_toy_overrides, monkeypatch):
    """Through the trainer (a registered user model): the step fails with the error instead of wrong gradients."""
    from meanflow.config import load_config
    from meanflow.models import registry
    from meanflow.training.trainer import train

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("ckpt-points", registry.Family(CheckpointedPoints, input_kind="points", example={"dim": 2}))(CheckpointedPoints)
    overrides = [*tiny_toy_overrides, "model.name=ckpt-points", "model.kwargs={}", "train.steps=2"]
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        train(load_config("toy", overrides), tmp_path / "run")


# ---- one process against two -------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
DIGITS = ["train", "--config", "digits", "--no-eval", "train.steps=4", "train.checkpoint_every=4", "train.batch_size=16",
          "train.warmup_steps=0", "train.device=cpu", "train.log_every=1", "data.flip=true",
          "model.kwargs={model_channels: 8, attn_resolutions: [], dropout: 0.1}"]


def _final(run) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve_checkpoint(run) / "model.safetensors"))


@pytest.mark.heavy
def test_one_and_two_processes_train_the_same_model_with_dropout_flips_and_labels(tmp_path):
    subprocess.run([sys.executable, "-m", "meanflow", *DIGITS, "--out", str(tmp_path / "one")], check=True, env=ENV, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "meanflow"]
    subprocess.run([*torchrun, *DIGITS, "--out", str(tmp_path / "two")], check=True, env=ENV, capture_output=True)
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    # the tolerance of the no-dropout test in test_training.py: equal up to float reduction order
    assert one.keys() == two.keys()
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert float(diffs.max()) < 1e-3 and float((diffs > 1e-6).float().mean()) < 0.01, (float(diffs.max()), float((diffs > 1e-6).float().mean()))
