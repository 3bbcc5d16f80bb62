"""The one-pass row tangent for any module (``meanflow.autodiff.rows``) against independent references.

Tangents are compared in float64 with ``torch.func.jvp`` (PyTorch's forward-mode AD) of the plain
function on the first n rows; primal outputs with the plain call, bit for bit; gradients with
the plain call's.
"""
from __future__ import annotations

import gc
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow import MeanFlowLoss
from meanflow.autodiff.row_mode import RowTangents
from meanflow.autodiff.rows import RowMixingError, row_jvp
from meanflow.autodiff.rules import heads_merge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plain_dit import PlainDiT  # noqa: E402
from user_models import BatchNormMLP, UserMLP, UserUNet  # noqa: E402

B, N = 5, 3  # batch, rows with a tangent
f64 = dict(dtype=torch.float64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **f64)


def reference_jvp(fn, primals, tangents):
    """torch.func.jvp (SDPA through its math kernel: the fused CPU kernel has no forward-mode rule)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, primals, tangents)[1]


def check_fn(fn, *shapes: tuple[int, ...], rows: int = N, plain: tuple = ()) -> None:
    """row_jvp of fn(*tensors, *plain) against the plain call (primal) and torch.func.jvp on the rows (tangent).

    Plain arguments with the batch in dimension 0 are cut to the rows for the reference.
    """
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    dxs = [rand(rows, *s[1:], seed=10 + i) for i, s in enumerate(shapes)]
    out, tangent = row_jvp(lambda *a: fn(*a, *plain), xs, dxs)
    head = [p[:rows] if isinstance(p, torch.Tensor) and p.ndim and p.shape[0] == shapes[0][0] else p for p in plain]
    ref = reference_jvp(lambda *a: fn(*a, *head), tuple(x[:rows] for x in xs), tuple(dxs))
    torch.testing.assert_close(out, fn(*xs, *plain), rtol=0, atol=0)
    torch.testing.assert_close(tangent, ref, rtol=1e-10, atol=1e-12)
    assert not tangent.requires_grad


W, BIAS = rand(7, 6, seed=20), rand(7, seed=21)
CONV = rand(4, 3, 3, 3, seed=22)
RMS_WEIGHT = rand(3, 6, seed=23)
OPS = {
    "linear": (lambda x: F.linear(x, W, BIAS), (B, 4, 6)),
    "conv_pool_interpolate": (lambda x: F.interpolate(F.avg_pool2d(F.conv2d(x, CONV, padding=1), 2), scale_factor=2, mode="bilinear"), (B, 3, 6, 6)),
    "conv_transpose_pad": (lambda x: F.conv_transpose2d(F.pad(x, (1, 0, 2, 1), value=3.0), CONV, stride=2), (B, 4, 5, 5)),
    "matmul_broadcast": (lambda a, b: (a @ b) @ W.T, (B, 2, 4, 3), (B, 1, 3, 6)),
    "matmul_rows": (lambda a: a @ W.T, (B, 6)),
    "bmm_merged_heads": (lambda a, b: torch.bmm(a.reshape(len(a) * 2, 3, 4), b.reshape(len(b) * 2, 4, 2)).reshape(len(a), 2, 3, 2), (B, 2, 3, 4), (B, 2, 4, 2)),
    "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b) + torch.einsum("...j,kj->...k", a, W[:, :4]).sum(-1, keepdim=True), (B, 3, 4), (B, 4, 5)),
    "einsum_permute": (lambda a: torch.einsum("nhwc->nchw", a), (B, 2, 3, 4)),
    "layer_group_rms_norm": (lambda x: F.rms_norm(F.group_norm(F.layer_norm(x, (6,), W[0], BIAS[:6]), 2, W[1, :4], BIAS[:4]), (3, 6), RMS_WEIGHT), (B, 4, 3, 6)),
    "softmax_log_softmax": (lambda x: x.softmax(-1) + F.log_softmax(x, dim=1).exp(), (B, 4, 6)),
    "activations": (lambda x: F.gelu(x, approximate="tanh") + F.silu(x) * torch.sigmoid(x) - F.relu(x).tanh() + F.gelu(x), (B, 7)),
    "arithmetic": (lambda x, y: (x * y - 2.0 * y + (1.0 - x) / 4.0) / (y.square() + 1) + 1.0 / (2 + x.square()) - y, (B, 4), (B, 4)),
    "broadcast_plain_operands": (lambda x, p: torch.addcmul(p, x, 1 + p) * p + x / (1 + p.abs()), (B, 3, 6)),
    "generic_ops": (lambda x: torch.where(x > 0, x.exp(), x.sin()).pow(2).cumsum(-1).clamp(-1, 2) + F.max_pool1d(x, 2).repeat(1, 1, 2)[..., :6], (B, 3, 6)),
    "views": (lambda x: x.reshape(x.shape[0], 6, 4).permute(0, 2, 1).flatten(1)[:, None].mT.squeeze(-1).unflatten(1, (4, 6)).transpose(1, 2).contiguous().view(x.shape[0], -1), (B, 4, 6)),
    "views_timm": (lambda x: x.reshape(len(x), 4, 3, 2, 1).permute(2, 0, 3, 1, 4).unbind(0)[1].transpose(1, 2).reshape(len(x), 4, 2), (B, 4, 6)),
    "split_cat_stack_index": (lambda x: torch.cat([x.chunk(2, dim=2)[1], x.split([1, 2], dim=1)[0].expand(-1, 3, -1)[..., 1:4]], dim=1)[:, 1:, None, ::2].mean(2) + torch.stack(x.unbind(1), dim=-1)[:, None, :2, 0].sum(1, keepdim=True), (B, 3, 6)),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (B, 2, 5, 4), (B, 2, 6, 4), (B, 2, 6, 3)),
    "sdpa_causal_scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), (B, 2, 5, 4), (B, 2, 5, 4), (B, 2, 5, 4)),
    "sdpa_gqa_plain_kv": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (B, 2, 5, 4)),
    "sdpa_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), (B, 4, 5, 4), (B, 2, 6, 4), (B, 2, 6, 3)),
    "sdpa_by_head": (lambda x: F.scaled_dot_product_attention(*x.reshape(len(x), 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)), (B, 5, 24)),
    "sdpa_by_head_gqa_causal": (lambda x, y: F.scaled_dot_product_attention(x.reshape(len(x), 5, 4, 3).transpose(1, 2), *y.reshape(len(y), 6, 2, 2, 3).permute(2, 0, 3, 1, 4).unbind(0), is_causal=True, enable_gqa=True), (B, 5, 12), (B, 6, 12)),
    "einsum_plain_batch_operand": (lambda a, p: torch.einsum("bij,bj->bi", a, p), (B, 3, 4)),
    "matmul_plain_batch_operand": (lambda a, p: a @ p, (B, 2, 3)),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("rows", [N, B])
def test_ops_match_forward_mode_ad(name, rows):
    fn, *shapes = OPS[name]
    plain = {"broadcast_plain_operands": (rand(B, 1, 6, seed=40),),
             "sdpa_gqa_plain_kv": (rand(B, 1, 6, 4, seed=30), rand(B, 1, 6, 4, seed=31)),
             "einsum_plain_batch_operand": (rand(B, 4, seed=41),), "matmul_plain_batch_operand": (rand(B, 3, 6, seed=42),)}.get(name, ())
    check_fn(fn, *shapes, rows=rows, plain=plain)


def test_sdpa_with_a_per_sample_mask():
    mask = torch.rand(B, 1, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    check_fn(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (B, 2, 5, 4), (B, 2, 6, 4), (B, 2, 6, 4), plain=(mask,))


def test_sdpa_by_head_with_a_per_head_mask():
    """Timm-style q, k, v (heads not mergeable with the batch: the tangent goes head by head), masks per sample and head or shared (4 tokens, batch 5)."""
    mask = torch.rand(B, 2, 4, 4, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True
    qkv = lambda x: x.reshape(len(x), 4, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    assert not heads_merge(qkv(rand(B, 4, 24))[0]) and heads_merge(rand(B, 2, 5, 4))
    check_fn(lambda x, m: F.scaled_dot_product_attention(*qkv(x), attn_mask=m), (B, 4, 24), plain=(mask,))
    for shared in (mask[0, 0], mask[0, :1], mask[:1, :1, 0]):  # (L, S), (1, L, S) and (1, 1, S): the same for every head
        check_fn(lambda x, m: F.scaled_dot_product_attention(*qkv(x), attn_mask=m), (B, 4, 24), plain=(shared,))


def test_the_users_grad_mode_holds_between_and_inside_calls():
    """Rules run with gradients off; the user's code and every primal see the user's own grad mode."""
    seen = {}

    def fn(x):
        y = x * 2.0
        seen["enabled"] = torch.is_grad_enabled()
        with torch.no_grad():
            seen["no_grad_output"] = (y + 1.0).requires_grad
        return F.layer_norm(y, (4,)).sin()

    x = rand(B, 4).requires_grad_()
    out, tangent = row_jvp(fn, (x,), (rand(N, 4, seed=1),))
    assert seen == {"enabled": True, "no_grad_output": False}
    assert out.requires_grad and not tangent.requires_grad and torch.is_grad_enabled()
    torch.testing.assert_close(tangent, reference_jvp(fn, (x.detach()[:N],), (rand(N, 4, seed=1),)), rtol=1e-10, atol=1e-12)


def test_in_place_ops_and_assignment():
    def fn(x, y):
        h = x.clone()
        h += y
        h.mul_(2.0)
        h = F.relu(h, inplace=True)
        out = torch.zeros(len(x), 4, 8, **f64)
        out[:, :, 2:] = h
        out[:, 0] = 1.0
        return F.silu(out, inplace=True)

    check_fn(fn, (B, 4, 6), (B, 4, 6))


def test_batch_norm_in_eval_mode_is_row_wise():
    bn = torch.nn.BatchNorm2d(3).double().eval()
    bn.running_mean.copy_(rand(3, seed=1))
    bn.running_var.copy_(rand(3, seed=2).abs() + 0.5)
    check_fn(bn, (B, 3, 2, 2))


MIXING = {
    "batch_norm": lambda x: torch.nn.BatchNorm1d(4).double().train()(x),
    "sum": lambda x: x - x.sum(0),
    "mean": lambda x: x * x.mean(),
    "cumsum": lambda x: x.cumsum(0),
    "__getitem__": lambda x: x[1:],
    "flip": lambda x: x.flip(0),
    "cat": lambda x: torch.cat([x, x], dim=0),
    "reshape": lambda x: x.T.reshape(-1),
    "repeat": lambda x: x.repeat(2, 1),
    "linear": lambda x: F.linear(x.T, rand(3, B)),
}


@pytest.mark.parametrize("name", list(MIXING))
def test_ops_that_mix_rows_raise_naming_the_op(name):
    x = rand(B, 4)
    with pytest.raises(RowMixingError, match=rf"{name}\(\)"):
        row_jvp(MIXING[name], (x,), (rand(N, 4, seed=1),))


def test_the_mixing_error_says_why_and_what_to_do():
    with pytest.raises(RowMixingError) as err:
        row_jvp(MIXING["cumsum"], (rand(B, 4),), (rand(N, 4, seed=1),))
    assert str(err.value) == (
        "cumsum() acts along dimension 0, the batch dimension: it acts along the batch dimension, so one sample's output "
        "would depend on other samples'. The one-pass row tangent follows only ops that treat each sample on its own; "
        "keep this op off the batch dimension (or use the 'forward_ad' / 'full' JVP modes).")


def test_dims_given_by_position_or_empty():
    x, dx = rand(B, 4), rand(N, 4, seed=1)
    out, tangent = row_jvp(lambda a: torch.roll(a, 1, 1), (x,), (dx,))  # dims as roll's third positional argument
    assert torch.equal(out, torch.roll(x, 1, 1)) and torch.equal(tangent, torch.roll(dx, 1, 1))
    with pytest.raises(RowMixingError, match=r"^sum\(\) acts along"):  # dim=() reduces every dimension, the batch too
        row_jvp(lambda a: a - a.sum(dim=()), (x,), (dx,))


def test_dropout_shares_its_mask_and_leaves_the_generator_as_a_plain_call():
    x, dx = rand(B, 300) + 3.0, rand(N, 300, seed=1)
    torch.manual_seed(0)
    out, tangent = row_jvp(lambda a: F.dropout(a, 0.4, training=True), (x,), (dx,))
    after = torch.rand(3)
    torch.manual_seed(0)
    plain = F.dropout(x, 0.4, training=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    kept = plain[:N] != 0
    assert 0.3 < (~kept).double().mean() < 0.5
    torch.testing.assert_close(tangent, torch.where(kept, dx / 0.6, torch.zeros_like(dx)), rtol=1e-15, atol=0)


def user_model(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {
        "dit_sdpa": lambda: PlainDiT(channels=3, size=8, dim=32, depth=2, heads=2, num_classes=4, **options),
        "dit_math": lambda: PlainDiT(channels=3, size=8, dim=32, depth=2, heads=2, fused=False, **options),
        "unet": lambda: UserUNet(**options),
        "mlp": lambda: UserMLP(**options),
    }[name]().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def model_inputs(name: str, batch: int = B):
    shape = (3,) if name == "mlp" else (3, 8, 8)
    z, v = rand(batch, *shape, seed=1), rand(batch, *shape, seed=2)
    r = torch.linspace(0.0, 0.4, batch, **f64)
    t = r + torch.linspace(0.5, 0.1, batch, **f64)
    labels = torch.arange(batch) % 5 if name == "dit_sdpa" else None
    return z, v, r, t, labels


@pytest.mark.parametrize("name", ["dit_sdpa", "dit_math", "unet", "mlp"])
@pytest.mark.parametrize("rows", [N, B])
def test_user_models_match_forward_mode_ad(name, rows):
    """du/dt of whole user models: float64, relative 1e-10; primal bit-identical; same gradients."""
    model = user_model(name)
    z, v, r, t, labels = model_inputs(name)
    ones = torch.ones(rows, **f64)
    out, du = row_jvp(lambda z_, t_: model(z_, r, t_, labels), (z, t), (v[:rows], ones))
    plain = model(z, r, t, labels)
    head = None if labels is None else labels[:rows]
    ref = reference_jvp(lambda z_, t_: model(z_, r[:rows], t_, head), (z[:rows], t[:rows]), (v[:rows], ones))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert ref.abs().max() > 1e-3
    assert (du - ref).abs().max() <= 1e-10 * ref.abs().max()
    grads = [torch.autograd.grad(y.square().sum(), list(model.parameters())) for y in (out, plain)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tangent_on_r_too():
    model = user_model("unet")
    z, v, r, t, _ = model_inputs("unet")
    dr, dt = rand(N, seed=5), rand(N, seed=6)
    _, du = row_jvp(lambda z_, r_, t_: model(z_, r_, t_), (z, r, t), (v[:N], dr, dt))
    ref = reference_jvp(lambda z_, r_, t_: model(z_, r_, t_), (z[:N], r[:N], t[:N]), (v[:N], dr, dt))
    assert (du - ref).abs().max() <= 1e-10 * ref.abs().max()


def kept_bytes(fn):
    """``fn()`` and the bytes of the tensors allocated during the call that are still alive after it.

    From the profiler's allocation and free events (their net sum): the result, and what autograd
    saved for backward. Tensors allocated before the call and freed during it do not count.
    """
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        gc.collect()
    return result, sum(event.self_cpu_memory_usage for event in prof.key_averages())


@pytest.mark.heavy
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_gives_the_same_tangent_and_gradients_at_lower_memory(dropout):
    """Checkpointed blocks (recomputed in backward, outside the row mode): the same du/dt and gradients.

    With dropout in the blocks too: the recomputation restores the generator state and draws the
    forward's masks again (the row mode leaves the generator as a plain call does).

    Memory: the row pass keeps for backward exactly what a plain forward of the same model keeps,
    plus its (n, ...) tangent (no tangent, no activation of a block held by the mode), so
    checkpointing cuts it as it cuts the plain forward's; and the mode tracks only the live
    inputs and output after the call.
    """
    z, v, r, t, labels = model_inputs("dit_sdpa")
    tangents, results, kept = (v[:N], torch.ones(N, **f64)), [], []
    for checkpoint in (False, True):
        model, modes = user_model("dit_sdpa", checkpoint=checkpoint, dropout=dropout).train(), []

        def fn(z_, t_):
            modes.append(torch.overrides._get_current_function_mode_stack()[-1])
            return model(z_, r, t_, labels)

        (out, du), row_pass = kept_bytes(lambda: row_jvp(fn, (z, t), tangents))
        _, plain = kept_bytes(lambda: model(z, r, t, labels))
        assert row_pass == plain + du.numel() * du.element_size()
        assert modes[0].tracked() == 3  # z, t and the output
        kept.append(row_pass)
        grads = torch.autograd.grad((out.square() * du.sum()).sum(), list(model.parameters()))
        results.append((out, du, torch.cat([g.flatten() for g in grads])))
    assert len(model.blocks) == 2 and kept[1] < 0.3 * kept[0]  # measured: 0.16 (0.14 with dropout)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["dit_sdpa", "unet"])
def test_bf16_autocast_keeps_the_plain_primal(name):
    """Under autocast the primal follows autocast's dtype policy exactly; the tangent agrees to bf16 precision."""
    model = user_model(name).float()
    z, v, r, t, labels = (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in model_inputs(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, du = row_jvp(lambda z_, t_: model(z_, r, t_, labels), (z, t), (v[:N], torch.ones(N)))
        plain = model(z, r, t, labels)
    ref = reference_jvp(lambda z_, t_: model(z_, r[:N], t_, None if labels is None else labels[:N]), (z[:N], t[:N]), (v[:N], torch.ones(N)))
    assert out.dtype == plain.dtype
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert (du.float() - ref).abs().max() < 5e-2 * ref.abs().max()


def test_dropout_model_in_training_mode_matches_the_plain_forward():
    """Same seed, same output as a plain forward; the tangent is exact given the masks drawn (checked against eval with p=0 scaled)."""
    model = user_model("unet", dropout=0.3).train()
    z, v, r, t, _ = model_inputs("unet")
    torch.manual_seed(1)
    out, du = row_jvp(lambda z_, t_: model(z_, r, t_), (z, t), (v[:N], torch.ones(N, **f64)))
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(z, r, t), rtol=0, atol=0)
    assert torch.isfinite(du).all() and du.abs().max() > 1e-3


def test_tangents_are_freed_with_their_primals():
    """Saved activations do not keep their tangents alive: after a deep forward only live tensors are tracked."""
    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(30)]).double()
    mode_sizes = []

    def fn(x):
        out = layers(x)
        mode_sizes.append(torch.overrides._get_current_function_mode_stack()[-1].tracked())
        return out

    row_jvp(fn, (rand(B, 8),), (rand(N, 8, seed=1),))
    assert mode_sizes[0] <= 3  # the input, the output and at most one in flight


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="one batch size"):
        row_jvp(lambda a, b: a + b, (rand(B, 2), rand(B + 1, 2)), (rand(N, 2), None))
    with pytest.raises(ValueError, match="primal's shape"):
        row_jvp(lambda a: a, (rand(B, 2),), (rand(N, 3),))
    with pytest.raises(ValueError, match="rows <= batch"):
        RowTangents(2, 3)
    with pytest.raises(ValueError, match="dropout_p > 0"):
        row_jvp(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1), (rand(B, 1, 3, 2),), (rand(N, 1, 3, 2),))


@pytest.mark.parametrize("name", ["dit_sdpa", "unet"])
def test_meanflow_loss_rows_mode_equals_the_full_batch_reference(name):
    """jvp='rows' (and 'auto', which picks it for a plain model) against jvp='full': loss, target, du/dt, gradients."""
    model = user_model(name)
    x, labels = rand(6, 3, 8, 8, seed=3), (torch.arange(6) % 4 if name == "dit_sdpa" else None)
    guidance = dict(omega=1.5, kappa=0.3) if name == "dit_sdpa" else {}
    results = {}
    for mode in ("rows", "auto", "full"):
        loss_fn = MeanFlowLoss(ratio=0.5, jvp=mode, **guidance)
        with sdpa_kernel(SDPBackend.MATH):
            out = loss_fn.targets(model, x, labels, generator=torch.Generator().manual_seed(4))
            loss, _ = loss_fn(model, x, labels, generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[mode] = (loss, out.target, out.dudt, torch.cat([g.flatten() for g in grads]))
    assert results["rows"][2].abs().max() > 1e-3
    for mode in ("auto", "full"):
        for a, b in zip(results["rows"], results[mode]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward_ad", "full"])
def test_forward_mode_jvps_run_a_float32_sdpa_model_without_a_kernel_choice(mode):
    """A user's float32 model on F.scaled_dot_product_attention: the fused kernel PyTorch picks has no
    forward-mode rule, so the forward-AD modes choose the math kernel themselves (no sdpa_kernel by the user)."""
    model = user_model("dit_sdpa").float()
    x, labels = rand(6, 3, 8, 8, seed=3).float(), torch.arange(6) % 4
    results = {}
    for name in ("rows", mode):
        loss_fn = MeanFlowLoss(ratio=0.5, jvp=name)
        out = loss_fn.targets(model, x, labels, generator=torch.Generator().manual_seed(4))
        results[name] = out.dudt
    assert results["rows"].abs().max() > 1e-3
    torch.testing.assert_close(results[mode], results["rows"], rtol=1e-4, atol=1e-5)


def test_auto_mode_takes_the_row_tangent_for_plain_models_and_reports_mixing():
    model = BatchNormMLP().double()
    with pytest.raises(RowMixingError, match=r"batch_norm\(\).*BatchNorm in training mode"):
        MeanFlowLoss(ratio=0.5)(model, rand(6, 3))
    loss, _ = MeanFlowLoss(ratio=0.5)(model.eval(), rand(6, 3))
    assert torch.isfinite(loss)


@pytest.mark.heavy
def test_compiled_model_gives_the_eager_loss_and_gradients_under_the_row_tangent():
    """A torch.compile'd model (its row pass traced and compiled by inductor) gives the eager model's gradients."""
    model = user_model("mlp")
    grads = []
    for net in (model, torch.compile(model)):
        loss, _ = MeanFlowLoss(ratio=0.5, jvp="rows")(net, rand(8, 3, seed=5), generator=torch.Generator().manual_seed(0))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)  # float64: fusion reorders sums


@pytest.mark.heavy
def test_training_with_compile_and_the_row_tangent_equals_eager_training(tmp_path):
    """train.compile=true with jvp=rows trains (the row pass traced and compiled, per-sample dropout
    included, with no eager fallback): the eager run's weights."""
    from meanflow.config import load_config
    from meanflow.runtime import checkpoint as ckpt
    from meanflow.training.trainer import train

    weights = []
    for compiled in ("false", "true"):
        cfg = load_config("toy", ["data.num_samples=256", "data.holdout=64", "model.kwargs={width: 16, depth: 2, dropout: 0.2}",
                                  "train.batch_size=32", "train.steps=3", "train.device=cpu", "objective.jvp=rows",
                                  f"train.compile={compiled}"])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the row tangent of the compiled")
            run = train(cfg, tmp_path / compiled)
        weights.append(ckpt.read_weights(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:  # compiled kernels round differently
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)
