"""The AlphaFlow objective: its two ends against closed forms, the alpha -> 0 limit against MeanFlow's JVP
target in float64, the schedule's values, the loss weighting by hand, any model, stages and a short run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from meanflow.config import load_config
from meanflow.models import create
from meanflow.objectives import AlphaFlowLoss, MeanFlowLoss, Shard
from meanflow.autodiff.per_sample import PerSampleDropout
from meanflow.training.trainer import train

from user_models import UserMLP


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("mlp", dim=3, width=32, depth=2, num_classes=0).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _fixed(alpha: float, **options) -> AlphaFlowLoss:
    """alpha held constant (no clamp)."""
    return AlphaFlowLoss(alpha_schedule="constant", alpha_initial=alpha, alpha_clamp=0.0, label_drop=0.0, **options)


def test_alpha_one_is_trajectory_flow_matching():
    """alpha = 1: every row regresses v = e - x at its own (r, t), z = (1 - t) x + t e, loss mean d / (d + c) by hand."""
    model, x = _model(), _data()
    loss_fn = _fixed(1.0)
    out = loss_fn.targets(model, x, generator=_gen())
    d = out.draws
    assert 0 < d.jvp_index.numel() < x.shape[0] and bool((d.r[d.jvp_index] < d.t[d.jvp_index]).all())  # r != t rows exist
    z = (1 - d.t[:, None]) * x + d.t[:, None] * d.noise
    v = d.noise - x
    torch.testing.assert_close(out.target, v, rtol=0, atol=1e-12)
    with torch.no_grad():
        err = (model(z, d.r, d.t) - v).pow(2).sum(1)
    loss, stats = loss_fn(model, x, generator=_gen())
    assert float(loss.detach()) == pytest.approx(float((err / (err + 1e-3)).mean()), rel=1e-10) and stats["alpha"] == 1.0


def test_alpha_zero_is_meanflows_jvp_target_exactly():
    model, x = _model(), _data()
    alpha = _fixed(0.0).targets(model, x, generator=_gen())
    meanflow = MeanFlowLoss(ratio=0.5, label_drop=0.0).targets(model, x, generator=_gen())
    torch.testing.assert_close(alpha.target, meanflow.target, rtol=0, atol=0)
    torch.testing.assert_close(alpha.dudt, meanflow.dudt, rtol=0, atol=0)


def test_as_alpha_goes_to_zero_the_step_direction_tends_to_the_jvp_target():
    """float64: u + (u_tgt - u) / alpha on the r != t rows differs from v - (t - r) du/dt by O(alpha)."""
    model, x = _model(), _data()
    meanflow = MeanFlowLoss(ratio=0.5, label_drop=0.0).targets(model, x, generator=_gen())
    rows = meanflow.draws.jvp_index
    errors = []
    for alpha in (1e-2, 1e-3, 1e-4):
        out = _fixed(alpha).targets(model, x, generator=_gen())
        u = out.u.detach()
        direction = u + (out.target - u) / alpha
        errors.append(float((direction - meanflow.target)[rows].abs().max()))
    scale = float(meanflow.target[rows].abs().max())
    assert errors[2] < 1e-4 * scale
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.05 < fine / coarse < 0.2, errors  # first order: ten times smaller alpha, ten times smaller error


def test_the_r_not_t_rows_are_weighted_by_alpha():
    """loss = mean_i s_i d_i / (d_i + c), s_i = alpha on r != t rows, 1 on r = t rows (c = weight_eps)."""
    model, x = _model(), _data()
    loss_fn = _fixed(0.3, weight_eps=0.01)
    loss, stats, out = loss_fn.loss_and_targets(model, x, generator=_gen())
    d = (out.u - out.target).pow(2).sum(1).detach()
    scale = torch.ones_like(d)
    scale[out.draws.jvp_index] = 0.3
    assert float(loss) == pytest.approx(float((scale * d / (d + 0.01)).mean()), rel=1e-10)
    assert float(stats["alpha"]) == 0.3


def test_the_alpha_target_takes_a_step_of_alpha_t_minus_r_along_v():
    """0 < alpha < 1: u_tgt = alpha v + (1 - alpha) u(z - D v, r, t - D), D = alpha (t - r), recomputed here."""
    model, x, alpha = _model(), _data(), 0.4
    out = _fixed(alpha).targets(model, x, generator=_gen())
    d, rows = out.draws, out.draws.jvp_index
    v = d.noise - x
    z = (1 - d.t[:, None]) * x + d.t[:, None] * d.noise
    step = alpha * (d.t - d.r)
    with torch.no_grad():
        expected = alpha * v + (1 - alpha) * model(z - step[:, None] * v, d.r, d.t - step)
    torch.testing.assert_close(out.target[rows], expected[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.target[d.fm_index], v[d.fm_index], rtol=0, atol=0)
    clipped = _fixed(alpha, target_clip=0.5).targets(model, x, generator=_gen())
    torch.testing.assert_close(clipped.target[rows], expected[rows].clamp(-0.5, 0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("progress, expected", [
    (0.0, 1.0), (0.2, 1.0),  # 1 - sigmoid(-7.5) = 0.99945 > 1 - 0.005: clamped to 1
    (0.3, 1 - 1 / (1 + math.exp(5.0))), (0.5, 0.5), (0.7, 1 / (1 + math.exp(5.0))),
    (0.8, 0.0), (1.0, 0.0),  # sigmoid(-7.5) = 0.00055 < 0.005: clamped to 0, the exact JVP target
])
def test_the_released_sigmoid_schedule(progress, expected):
    """alpha = 1 - sigmoid(25 (progress - 1/2)) over the whole run, clamped at 0.005 (the released B/2 recipe)."""
    assert AlphaFlowLoss().alpha_at(progress) == pytest.approx(expected, abs=1e-12)


def test_the_schedule_follows_the_step_and_the_anneal_window():
    late = AlphaFlowLoss(anneal_start=0.5, anneal_end=5 / 6)  # the released XL/2: steps 600k to 1M of 1.2M
    late.at_step(599_999, 1_200_000)
    assert late.alpha == 1.0
    late.at_step(800_000, 1_200_000)  # the middle of the window
    assert late.alpha == pytest.approx(0.5)
    late.at_step(1_000_000, 1_200_000)
    assert late.alpha == 0.0
    linear = AlphaFlowLoss(alpha_schedule="linear", anneal_start=0.25, anneal_end=0.75, alpha_clamp=0.0)
    assert [linear.alpha_at(p) for p in (0.0, 0.375, 0.5, 0.75, 1.0)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    assert AlphaFlowLoss().alpha == 1.0  # before any step: the start of the schedule
    with pytest.raises(ValueError, match="anneal_end .* must not be below anneal_start"):
        AlphaFlowLoss(anneal_start=0.6, anneal_end=0.5)
    with pytest.raises(ValueError, match="tangent=v00 is a MeanFlow ablation only"):
        AlphaFlowLoss(tangent="v00")


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_any_module_trains_through_the_jvp_layer(alpha):
    """A user's MLP (no Dual support: the row tangent at alpha = 0): finite loss, every weight gets a gradient;
    at alpha = 0 the same loss as MeanFlow's."""
    torch.manual_seed(0)
    model, x = UserMLP(), torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    loss, _ = _fixed(alpha)(model, x, generator=_gen())
    loss.backward()
    assert math.isfinite(float(loss)) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if alpha == 0.0:
        reference, _ = MeanFlowLoss(ratio=0.5, label_drop=0.0)(model, x, generator=_gen())
        assert float(loss) == pytest.approx(float(reference), rel=1e-6)


@pytest.mark.parametrize("loss_fn", [_fixed(0.5), _fixed(0.5, tangent_velocity="model"), MeanFlowLoss(ratio=0.5, tangent_velocity="model")],
                         ids=["alpha", "alpha-model-step", "meanflow-model-tangent"])
def test_the_extra_forward_passes_take_per_sample_dropout_masks(loss_fn):
    """Dropout 0.3: the batch in one piece, two or four shards gives the same loss and gradients (the forward passes on
    the r != t rows only get their rows' masks), and the masks act."""
    torch.manual_seed(0)
    model = create("mlp", dim=2, width=32, depth=2, num_classes=0, dropout=0.3)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))

    def run(shards: int) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        total, size = 0.0, 16 // shards
        for k in range(shards):
            part = slice(k * size, (k + 1) * size)
            with PerSampleDropout(7, torch.arange(16)[part], 16):
                loss, _ = loss_fn(model, x[part], generator=torch.Generator().manual_seed(3), shard=Shard(k * size, 16))
            (loss / shards).backward()
            total += loss.item() / shards
        return total, torch.cat([p.grad.flatten() for p in model.parameters()])

    reference_loss, reference_grad = run(1)
    for shards in (2, 4):
        loss, grad = run(shards)
        assert loss == pytest.approx(reference_loss, rel=1e-6), shards
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)
    model.eval()  # no dropout: other gradients (the adaptive weight keeps the loss itself near the same value)
    model.zero_grad()
    loss_fn(model, x, generator=torch.Generator().manual_seed(3))[0].backward()
    plain = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (plain - reference_grad).abs().max() > 0.1 * reference_grad.abs().max(), "dropout must be active above"


def test_a_short_run_logs_the_schedule_and_trains_after_a_flow_matching_stage(tmp_path, tiny_toy_overrides):
    """Two Flow Matching steps, then AlphaFlow with a linear schedule over the run: alpha of step s (0-based) of 8
    is 1 - s / 8, logged at every step of the AlphaFlow stage."""
    cfg = load_config("toy", [*tiny_toy_overrides, "train.steps=8", "train.log_every=1", "train.checkpoint_every=0",
                              "objective.kind=alphaflow", "objective.alpha_schedule=linear", "objective.alpha_clamp=0.0",
                              "stages=[{steps: 2, objective: {kind: flow_matching}}, {objective: {}}]", "eval.steps=[1]",
                              "eval.baseline_ode_steps=2", "eval.num_samples=64"])
    run = train(cfg, tmp_path / "run")
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    alphas = {entry["step"]: entry["alpha"] for entry in logged if entry.get("alpha") is not None}
    assert alphas == pytest.approx({s + 1: 1 - s / 8 for s in range(2, 8)})
    assert all(math.isfinite(entry["loss"]) for entry in logged)


def test_two_gloo_processes_train_as_one_through_the_whole_curriculum(tmp_path, tiny_toy_overrides):
    """A linear schedule over 6 steps, clamp 0.2 (alpha 1, 1 (5/6 > 1 - 0.2), 2/3, 1/2, 1/3, 0 (1/6 < 0.2)): trajectory Flow Matching,
    alpha-targets and the JVP target, with dropout 0.1, on 2 processes (DDP) as on one, up to float reduction order."""
    from test_training import _assert_same_training, _final_weights, _spawn

    overrides = [*tiny_toy_overrides, "train.steps=6", "train.checkpoint_every=6", "train.batch_size=32", "model.kwargs.dropout=0.1",
                 "objective.kind=alphaflow", "objective.alpha_schedule=linear", "objective.alpha_clamp=0.2", "train.log_every=3"]
    _spawn(2, tmp_path / "two", overrides)
    _spawn(1, tmp_path / "one", overrides)
    _assert_same_training(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"))
    logged = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [e["alpha"] for e in logged] == pytest.approx([(1 + 1 + 4 / 6) / 3, (3 / 6 + 2 / 6 + 0) / 3])  # each log: 3 steps' mean
