"""train.optimizer=muon: Muon on the Linear weights, Nesterov AdamW on the rest, against the official recipe's optax.contrib.muon."""
from __future__ import annotations

import copy
import math
import shutil

import numpy
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from meanflow.config import ConfigError, load_config
from meanflow.data import load_dataset
from meanflow.runtime import checkpoint as ckpt
from meanflow.training.builders import build_optimizer, load_optimizer_state
from meanflow.training.muon import MuonAdamW, muon_parameters
from meanflow.training.trainer import train

NS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz coefficients of Muon (optax and torch)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 6)
        self.conv = nn.Conv2d(1, 6, 3)
        self.wide = nn.Linear(6, 10)  # fan_out > fan_in: step scaled by sqrt(10 / 6)
        self.norm = nn.LayerNorm(10)
        self.narrow = nn.Linear(10, 4, bias=False)


def _muon_direction(update: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz steps on update / ||update||_F in float64 (the official ``orthogonalize``)."""
    x = update.double()
    tall = x.shape[0] > x.shape[1]
    x = (x.T if tall else x) / (x.norm() + 1e-8)
    for _ in range(5):
        a = x @ x.T
        x = NS[0] * x + (NS[1] * a + NS[2] * a @ a) @ x
    return x.T if tall else x


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_linear_weights_get_muon_and_the_rest_adamw():
    model = Small()
    matrices, others = muon_parameters(model)
    assert [id(p) for p in matrices] == [id(model.wide.weight), id(model.narrow.weight)]
    assert {id(p) for p in others} == {id(p) for p in model.parameters()} - {id(p) for p in matrices}
    opt = build_optimizer(model, load_config("toy", ["train.optimizer=muon", "train.lr=0.01"]).train)
    adam, muon = opt.param_groups
    assert adam["betas"] == (0.9, 0.95) and adam["weight_decay"] == 0.0 and adam["eps"] == 1e-8
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"], muon["weight_decay"]) == (0.95, True, 5, 0.0)
    assert tuple(muon["ns_coefficients"]) == pytest.approx(NS)


def test_two_steps_follow_the_official_update():
    """Muon: Nesterov momentum 0.95, Newton-Schulz direction, step lr sqrt(max(1, out / in)); Nesterov Adam (0.9, 0.95) elsewhere."""
    torch.manual_seed(0)
    model = Small()
    start = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    lr, beta = 0.01, 0.95
    opt = MuonAdamW(model, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    _grads(model, 1)
    g1 = {k: p.grad.double() for k, p in model.named_parameters()}
    opt.step()
    _grads(model, 2)
    g2 = {k: p.grad.double() for k, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        if name in ("wide.weight", "narrow.weight"):
            m1 = (1 - beta) * g1[name]
            m2 = beta * m1 + (1 - beta) * g2[name]
            nesterov = [(1 - beta) * g1[name] + beta * m1, (1 - beta) * g2[name] + beta * m2]
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            step = -lr * scale * sum(_muon_direction(n) for n in nesterov)
            moved = p.detach().double() - start[name]
            assert float((moved - step).norm() / step.norm()) < 0.05, name  # torch runs Newton-Schulz in bfloat16
            continue
        else:
            m, v, expect = 0.0, 0.0, start[name].clone()
            for k, g in enumerate((g1[name], g2[name]), start=1):  # optax's scale_by_adam(nesterov=True)
                m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
                m_hat = 0.9 * m / (1 - 0.9 ** (k + 1)) + 0.1 * g / (1 - 0.9**k)
                expect = expect - lr * m_hat / ((v / (1 - 0.95**k)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expect, rtol=0, atol=1e-6, msg=name)


def _to_flax(name: str, value: torch.Tensor):
    """A parameter (or gradient) of Small in the layout of the official Flax network: dense kernels (in, out),
    embedding tables (1, N, D) (not 2-D there, so not Muon's)."""
    value = value.detach()
    return (value.T if name.endswith(("wide.weight", "narrow.weight")) else value[None] if name == "emb.weight" else value).numpy()


def test_the_updates_equal_optax_muon_the_official_optimizer():
    """Nesterov AdamW part: equal from the first step. Muon part: optax bias-corrects its Nesterov mix of momentum and
    gradient, torch does not (different for the first ~100 steps, 0.95^k); once that has decayed the steps agree
    (up to torch's bfloat16 Newton-Schulz)."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    torch.manual_seed(0)
    model = Small()
    params = {n: jnp.asarray(_to_flax(n, p)) for n, p in model.named_parameters()}
    tx = optax.contrib.muon(learning_rate=0.001, adam_b2=0.95)
    state, update = tx.init(params), jax.jit(tx.update)
    opt = MuonAdamW(model, lr=0.001, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(1, 202):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _grads(model, step)
        updates, state = update({n: jnp.asarray(_to_flax(n, p.grad)) for n, p in model.named_parameters()}, state, params)
        params = optax.apply_updates(params, updates)
        opt.step()
        for n, p in model.named_parameters():
            mine = _to_flax(n, p.detach() - before[n])
            theirs = numpy.asarray(updates[n])
            if n not in ("wide.weight", "narrow.weight"):
                numpy.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=2e-7, err_msg=f"{n} at step {step}")
            elif step in (2, 201):
                gap = numpy.linalg.norm(mine - theirs) / numpy.linalg.norm(theirs)
                assert gap < 0.05 if step == 201 else gap > 0.05, (n, step, gap)


def test_a_skipped_step_changes_nothing_and_state_round_trips():
    torch.manual_seed(0)
    model, twin = Small(), Small()
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, load_config("toy", ["train.optimizer=muon"]).train)
    other = build_optimizer(twin, load_config("toy", ["train.optimizer=muon"]).train)
    for seed, skip in ((1, True), (2, False), (3, True), (4, False)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        state_before = opt.state_dict()
        _grads(model, seed)
        if skip:
            for p in model.parameters():
                p.grad[0] = float("nan")
        opt.found_inf = torch.tensor(float(skip))
        opt.step()
        if skip:
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            after = opt.state_dict()["state"]
            for i, values in state_before["state"].items():
                assert all(torch.equal(v, after[i][k]) for k, v in values.items())
        else:
            _grads(twin, seed)
            other.step()  # no found_inf: a plain step
            assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())
    saved = opt.state_dict()
    assert len(saved["param_groups"]) == 2 and sorted(saved["state"]) == list(range(8))
    fresh_model = Small()
    fresh_model.load_state_dict(model.state_dict())
    fresh = build_optimizer(fresh_model, load_config("toy", ["train.optimizer=muon"]).train)
    load_optimizer_state(fresh, copy.deepcopy(saved))  # as read back from a checkpoint file
    _grads(model, 9), _grads(fresh_model, 9)
    opt.found_inf = fresh.found_inf = torch.tensor(0.0)
    opt.step(), fresh.step()
    assert all(torch.equal(v, fresh_model.state_dict()[k]) for k, v in model.state_dict().items())


def test_muon_refuses_fsdp_and_models_without_linear_layers():
    with pytest.raises(ConfigError, match="train.parallel=ddp"):
        load_config("toy", ["train.optimizer=muon", "train.parallel=fsdp"])
    with pytest.raises(ConfigError, match="train.muon_adjust_lr"):
        load_config("toy", ["train.optimizer=muon", "train.muon_adjust_lr=spectral"])
    with pytest.raises(ValueError, match="nn.Linear"):
        MuonAdamW(nn.Conv2d(1, 2, 3), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)


def test_training_with_muon_resumes_exactly(tmp_path, tiny_toy_overrides):
    args = [*tiny_toy_overrides, "train.optimizer=muon", "train.steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3"]
    cfg = load_config("toy", args)
    data = load_dataset(cfg.data, cfg.seed)
    train(cfg, tmp_path / "full", dataset=data)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / ckpt.checkpoint_name(8))  # as if stopped after step 4
    train(cfg, tmp_path / "resumed", resume=True, dataset=data)
    full = load_file(str(ckpt.resolve_checkpoint(tmp_path / "full") / "model.safetensors"))
    resumed = load_file(str(ckpt.resolve_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    start = load_file(str(tmp_path / "full" / "checkpoints" / ckpt.checkpoint_name(4) / "model.safetensors"))
    assert any(not torch.equal(full[k], start[k]) for k in full)
