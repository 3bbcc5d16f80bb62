"""Objectives as plug-ins: the draws layer (label drops, shards), the JVP layer, options declared once."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from meanflow import FlowMatchingLoss, MeanFlowLoss, objectives
from meanflow.autodiff import Tangent, jvp
from meanflow.config import ConfigError, from_dict, load_config
from meanflow.models import create
from meanflow.objectives import Shard
from meanflow.options import Option


class TanhNet(nn.Module):
    """A random u(z, r, t) that depends on z, r and t separately (independent of the package's models)."""

    num_classes = 0

    def __init__(self, dim: int = 3):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim + 2, 16), nn.Linear(16, dim)

    def forward(self, z, r, t, labels=None):
        return self.l2(torch.tanh(self.l1(torch.cat([z, r[:, None] ** 2, torch.sin(3 * t[:, None])], dim=1))))


def _draws(loss_fn, total=4000, seed=0, shard=None, size=None):
    x = torch.zeros(size or total, 2)
    return loss_fn.draw(x, torch.Generator().manual_seed(seed), shard or Shard(0, total))


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_label_drops_fall_on_r_equals_t_rows_by_default(ratio):
    d = _draws(MeanFlowLoss(ratio=ratio, label_drop=0.1))
    assert not (d.dropped & d.jvp_rows).any()
    frac = d.dropped.double().mean().item()  # Binomial(4000, 0.1) / 4000: sd 0.0047
    assert abs(frac - 0.1) < 0.02, frac
    # the old behaviour, now an option: independent drops, about 10% of the r != t rows too
    old = _draws(MeanFlowLoss(ratio=ratio, label_drop=0.1, independent_label_drop=True))
    on_jvp_rows = old.dropped[old.jvp_index].double().mean().item()
    assert abs(on_jvp_rows - 0.1) < 0.03, on_jvp_rows


def test_drops_spill_onto_r_not_t_rows_only_when_r_equals_t_rows_run_out():
    d = _draws(MeanFlowLoss(ratio=0.95, label_drop=0.1))
    fm = ~d.jvp_rows
    assert d.dropped[fm].all() and d.dropped[d.jvp_rows].any()
    assert not _draws(MeanFlowLoss(ratio=0.5, label_drop=0.0)).dropped.any()


def test_shards_draw_the_global_batch_including_drops():
    loss_fn = MeanFlowLoss(ratio=0.25, label_drop=0.3)
    full = _draws(loss_fn, total=64, seed=2)
    halves = [_draws(loss_fn, total=64, seed=2, shard=Shard(o, 64), size=32) for o in (0, 32)]
    for name in ("noise", "r", "t", "dropped", "jvp_rows"):
        torch.testing.assert_close(torch.cat([getattr(h, name) for h in halves]), getattr(full, name))
    assert full.dropped.any()


def test_a_shard_must_lie_inside_the_global_batch_and_uniforms_are_float64():
    x = torch.zeros(8, 2)
    for shard, shown in [(Shard(-1, 16), r"\[-1, 7\)"), (Shard(12, 16), r"\[12, 20\)")]:
        with pytest.raises(ValueError, match=r"^shard " + shown + " lies outside a global batch of 16$"):
            objectives.BatchRandom(x, torch.Generator().manual_seed(0), shard)
    rand = objectives.BatchRandom(x, torch.Generator().manual_seed(0), Shard(8, 16))
    u = rand.uniform()
    assert u.dtype == torch.float64 and u.shape == (8,)
    torch.testing.assert_close(u, torch.rand(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[8:], rtol=0, atol=0)


def test_objectives_are_registered_plug_ins_with_their_own_options():
    assert {"meanflow", "flow_matching"} <= set(objectives.available())
    assert not issubclass(FlowMatchingLoss, MeanFlowLoss)
    assert isinstance(objectives.create("meanflow", ratio=0.5), MeanFlowLoss)
    assert "ratio" not in FlowMatchingLoss.option_set().options and "jvp" not in FlowMatchingLoss.option_set().options
    assert FlowMatchingLoss().weight_power == 0.0 and MeanFlowLoss().weight_power == 1.0
    with pytest.raises(ValueError, match=r"'flow_matching' does not read option ratio \(read by objective .*'meanflow'"):
        FlowMatchingLoss(ratio=0.5)


def test_a_user_objective_registers_by_kind_with_its_options(monkeypatch):
    from meanflow import options as opts
    from meanflow.objectives import base

    monkeypatch.setattr(opts, "_REGISTRY", {section: dict(kinds) for section, kinds in opts._REGISTRY.items()})

    class Halved(base.Objective, base.WeightOptions):
        kind = "halved"
        scale = Option(0.5, above=0.0, doc="a factor")

        def targets(self, model, x, labels=None, generator=None, *, shard=None):
            return x

        def reduce(self, out):
            return self.scale * out.sum(), {}  # no statistics

    assert base.register(Halved) is Halved
    assert objectives.get("halved") is Halved and "halved" in objectives.available() and "halved" in opts.kinds("objective")
    made = objectives.create("halved", scale=2.0)
    assert isinstance(made, Halved) and made.scale == 2.0 and made.weight_eps == 1e-3
    assert repr(made) == "Halved(weight_power=1.0, weight_eps=0.001, scale=2.0)"
    loss, stats = made(None, torch.ones(3, 2))
    assert float(loss) == 12.0 and stats == {}

    class Nameless(base.Objective):
        pass

    with pytest.raises(ValueError, match="Nameless needs a kind name to be registered"):
        base.register(Nameless)
    assert "" not in objectives.available()


def test_config_objective_section_uses_the_objectives_declarations():
    assert from_dict({}).objective.to_dict() == {"kind": "meanflow", **MeanFlowLoss().options}
    cfg = from_dict({"objective": {"kind": "flow_matching", "weight_eps": 0.01}})
    assert objectives.create(cfg.objective.kind, **cfg.objective.options).options == cfg.objective.resolved()
    with pytest.raises(ConfigError, match=r"objective 'flow_matching' does not read option objective\.ratio"):
        load_config("toy", ["objective.kind=flow_matching", "objective.ratio=0.5"])
    with pytest.raises(ConfigError, match=r"objective\.jvp must be one of auto, dual, forward_ad, full"):
        load_config("toy", ["objective.jvp=fast"])
    # switching the kind of a preset keeps only the preset's options the new kind reads
    assert load_config("toy", ["objective.kind=flow_matching"]).objective.options == {"time_sampler": "cifar_v1", "mu": -0.4, "sigma": 1.0, "weight_power": 0.0,
                                                                                     "velocity": "batch"}


def _fd(model, z, r, t, dz, dr, dt, h=1e-6):
    return (model(z + h * dz, r + h * dr, t + h * dt) - model(z - h * dz, r - h * dr, t - h * dt)) / (2 * h)


@pytest.mark.parametrize("mode", ["auto", "forward_ad", "full"])
def test_jvp_layer_takes_tangents_on_z_t_and_r_for_a_row_subset(mode):
    torch.manual_seed(0)
    net = TanhNet().double()
    z, dz = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    r, t = torch.rand(7, dtype=torch.float64) * 0.4, 0.5 + torch.rand(7, dtype=torch.float64) * 0.4
    rows = torch.tensor([5, 1, 3])
    dt, dr = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), 1.0
    out = jvp(net, z, r, t, None, rows, Tangent(z=dz, t=dt, r=dr), mode=mode)
    torch.testing.assert_close(out.u, net(z, r, t), rtol=1e-13, atol=1e-15)  # subsets round matmuls differently
    ref = _fd(net, z[rows], r[rows], t[rows], dz, torch.full((3,), dr, dtype=torch.float64), dt)
    torch.testing.assert_close(out.du, ref, rtol=1e-7, atol=1e-9)
    assert out.u.requires_grad and not out.du.requires_grad and out.v is None


def test_a_new_jvp_mode_is_one_register_mode_call(monkeypatch):
    layer = importlib.import_module("meanflow.autodiff.jvp")  # the module (the package exports the function jvp)
    monkeypatch.setattr(layer, "MODES", dict(layer.MODES))
    monkeypatch.setattr(layer, "AUTO_ORDER", list(layer.AUTO_ORDER))
    before, calls = list(layer.AUTO_ORDER), []

    def run(call, rows, tangent):
        calls.append(rows.tolist())
        return layer.MODES["full"].run(call, rows, tangent)

    layer.register_mode(layer.JVPMode("mine", run, lambda call, tangent: None), auto_before="rows")
    at = before.index("rows")
    assert layer.AUTO_ORDER == [*before[:at], "mine", *before[at:]] and layer.mode_names()[-1] == "mine"
    torch.manual_seed(0)
    net, z = TanhNet().double(), torch.randn(5, 3, dtype=torch.float64)
    r, t, rows, dz = torch.full((5,), 0.2, dtype=torch.float64), torch.full((5,), 0.7, dtype=torch.float64), torch.tensor([3, 0]), torch.randn(2, 3, dtype=torch.float64)
    out = jvp(net, z, r, t, None, rows, Tangent(z=dz))  # auto: dual cannot run a plain module, "mine" comes next
    assert calls == [[3, 0]]
    torch.testing.assert_close(out.du, jvp(net, z, r, t, None, rows, Tangent(z=dz), mode="forward_ad").du, rtol=1e-10, atol=1e-12)
    layer.register_mode(layer.JVPMode("mine", run, lambda call, tangent: None), auto=False)  # again: out of "auto"
    assert layer.AUTO_ORDER == before and "mine" in layer.mode_names()
    layer.register_mode(layer.JVPMode("last", run, lambda call, tangent: None))
    assert layer.AUTO_ORDER == [*before, "last"]


def test_dual_mode_takes_no_r_tangent_and_auto_falls_back():
    model = create("mlp", dim=3, width=16, depth=1).double()
    z, r, t = torch.randn(4, 3, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    rows, tangent = torch.tensor([0, 2]), Tangent(z=torch.randn(2, 3, dtype=torch.float64), r=1.0)
    with pytest.raises(ValueError, match="no tangent on r"):
        jvp(model, z, r, t, None, rows, tangent, mode="dual")
    auto = jvp(model, z, r, t, None, rows, tangent)
    torch.testing.assert_close(auto.du, jvp(model, z, r, t, None, rows, tangent, mode="full").du, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"tangent on z must have shape \(2, 3\)"):
        jvp(model, z, r, t, None, rows, Tangent(z=torch.zeros(4, 3, dtype=torch.float64)))


def test_cli_lists_each_objectives_options(capsys):
    from meanflow.cli import main

    assert main(["objectives", "--kind", "flow_matching"]) == 0
    text = capsys.readouterr().out
    assert "objective.weight_power=0.0" in text and "objective.ratio" not in text
    assert main(["objectives", "--kind", "consistency"]) == 2


@pytest.mark.parametrize("tangent, dr, dt", [("v01", 0.0, 1.0), ("v00", 0.0, 0.0), ("v10", 1.0, 0.0)])
def test_tangent_ablation_option_differentiates_along_the_named_tangent(tangent, dr, dt):
    torch.manual_seed(0)
    net = TanhNet().double()
    out = MeanFlowLoss(ratio=0.5, tangent=tangent).targets(net, torch.randn(16, 3, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    d, rows = out.draws, out.draws.jvp_index
    ones = torch.ones(rows.numel(), dtype=torch.float64)
    ref = _fd(net, out.z[rows], d.r[rows], d.t[rows], out.v[rows], dr * ones, dt * ones)
    torch.testing.assert_close(out.dudt[rows], ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.target[rows], out.v[rows] - (d.t - d.r)[rows, None] * ref, rtol=1e-7, atol=1e-9)
