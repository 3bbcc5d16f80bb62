"""The row tangent of a ``torch.compile``'d model (``meanflow.autodiff.rows_compiled``).

The traced and compiled row pass must give what the eager row pass gives (u, du/dt, the loss's
gradients) on a user's plain DiT, keep doing so after the optimizer moves the weights, run no
Python rule per op after its trace, keep the tangent out of autograd's saved tensors, and run
eagerly (saying why) where a trace would be wrong. The models are compiled with the ``aot_eager``
backend, which the row pass takes from them: the same graphs inductor would get, without its
minutes of code generation on the CPU.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch

import meanflow.autodiff.rows_compiled as rows_compiled
from meanflow import MeanFlowLoss
from meanflow.autodiff.jvp import Tangent, jvp
from meanflow.autodiff.rows import RowMixingError
from meanflow.autodiff.per_sample import PerSampleDropout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from plain_dit import PlainDiT  # noqa: E402
from user_models import BatchNormMLP  # noqa: E402


def plain_dit(**options) -> PlainDiT:
    torch.manual_seed(0)
    model = PlainDiT(channels=3, size=8, dim=32, depth=2, heads=2, num_classes=4, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(size, 3, 8, 8, generator=g), torch.arange(size) % 4


def step(model, net, x, labels, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, du/dt, flat gradient) of one MeanFlow loss on net (model or its compiled form)."""
    model.zero_grad(set_to_none=True)
    loss_fn = MeanFlowLoss(ratio=0.5)
    dudt = loss_fn.targets(net, x, labels, generator=torch.Generator().manual_seed(seed)).dudt
    loss, _ = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), dudt, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.heavy
def test_compiled_row_pass_equals_the_eager_one_and_follows_the_weights():
    model = plain_dit()
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for seed in (4, 5):
        eager, traced = step(model, model, x, labels, seed), step(model, compiled, x, labels, seed)
        assert eager[1].abs().max() > 1e-3
        for a, b in zip(eager, traced):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        optimizer.step()  # the next round must see the moved weights
    graphs = rows_compiled._GRAPHS[model]
    assert len(graphs) == 1 and callable(next(iter(graphs.values())))


@pytest.mark.heavy
def test_no_rule_runs_after_the_trace(monkeypatch):
    model = plain_dit()
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    calls = []
    row_jvp = rows_compiled.row_jvp
    monkeypatch.setattr(rows_compiled, "row_jvp", lambda *a: calls.append(1) or row_jvp(*a))
    for seed in (4, 5, 6):
        step(model, compiled, x, labels, seed)
    assert len(calls) == 1  # the trace; the other five calls ran the compiled graph


@pytest.mark.heavy
def test_each_part_of_the_signature_gets_its_own_graph():
    """Batch size, grad mode, autocast and the training flag each change the trace: each gets a new graph
    that agrees with the eager row pass (a reused graph would drop gradients, casts or BatchNorm's mode)."""
    model = PlainDiT(channels=3, size=8, dim=32, depth=1, heads=2, num_classes=4)
    model.out.register_forward_hook(lambda m, i, o: o * (1.5 if m.training else 0.5))  # the training flag matters
    compiled = torch.compile(model, backend="aot_eager")
    rows = torch.arange(2)

    def both(x, labels):
        z, t = torch.randn_like(x), torch.linspace(0.2, 0.9, len(x))
        call = (z, t * 0.5, t, labels, rows, Tangent(z=torch.ones(2, *x.shape[1:])))
        return jvp(model, *call, mode="rows"), jvp(compiled, *call, mode="rows")

    contexts = [lambda: contextlib.nullcontext(), lambda: contextlib.nullcontext(), torch.no_grad,
                lambda: torch.autocast("cpu", dtype=torch.bfloat16), lambda: contextlib.nullcontext()]
    for count, (size, context) in enumerate(zip((6, 4, 6, 6, 6), contexts), start=1):
        if count == 5:
            model.eval()
        with context():
            eager, traced = both(*batch(size))
        assert len(rows_compiled._GRAPHS[model]) == count
        assert traced.u.requires_grad == eager.u.requires_grad and traced.u.dtype == eager.u.dtype
        torch.testing.assert_close(traced.u, eager.u, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(traced.du, eager.du, rtol=2e-2, atol=1e-3)


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while fn() runs."""
    total = []

    def pack(x):
        total.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(total)


@pytest.mark.heavy
def test_the_tangent_stays_out_of_autograd():
    """The compiled row pass saves what the compiled plain forward saves: no tangent activations."""
    model = plain_dit()
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    z, t = torch.randn_like(x), torch.rand(6)
    rows = torch.arange(3)
    plain = saved_bytes(lambda: compiled(z, t * 0.5, t, labels))
    row_pass = saved_bytes(lambda: jvp(compiled, z, t * 0.5, t, labels, rows, Tangent(z=torch.randn(3, 3, 8, 8))))
    assert plain > 0 and row_pass <= 1.05 * plain


def test_a_model_that_draws_random_numbers_runs_the_eager_row_pass():
    model = plain_dit(dropout=0.2)
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    with pytest.warns(UserWarning, match=r"runs eagerly: its forward pass draws random numbers \(dropout"):
        step(model, compiled, x, labels)
    assert all(isinstance(reason, str) for reason in rows_compiled._GRAPHS[model].values())


@pytest.mark.heavy
def test_bf16_autocast_matches_the_eager_row_pass():
    model = plain_dit()
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, traced = step(model, model, x, labels), step(model, compiled, x, labels)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_a_model_that_mixes_rows_raises_as_it_does_eagerly():
    with pytest.raises(RowMixingError, match=r"batch_norm\(\)"):
        MeanFlowLoss(ratio=0.5)(torch.compile(BatchNormMLP(), backend="aot_eager"), torch.randn(6, 3))


@pytest.mark.heavy
def test_the_traced_graphs_do_not_keep_the_model_alive():
    model = plain_dit()
    step(model, torch.compile(model, backend="aot_eager"), *batch())
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class TwoHeads(torch.nn.Module):
    """A user's two-headed model with an extra conditioning input, as iMF models are called."""

    num_classes = 0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.u, self.v = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)

    def forward(self, z, r, t, labels=None, omega=None, return_v=False):
        h = torch.tanh(self.body(torch.cat([z, r[:, None], t[:, None], omega[:, None]], dim=1)))
        return (self.u(h), self.v(h)) if return_v else self.u(h)


def test_conditioning_and_a_second_head_go_through_the_compiled_pass():
    model = TwoHeads()
    compiled = torch.compile(model, backend="aot_eager")
    z, t = torch.randn(6, 3), torch.rand(6)
    args = (z, t * 0.5, t, None, torch.tensor([0, 2, 4]), Tangent(z=torch.randn(3, 3), r=torch.rand(3)))
    options = dict(conditioning={"omega": torch.rand(6) + 1}, return_v=True)
    eager, traced = jvp(model, *args, mode="rows", **options), jvp(compiled, *args, mode="rows", **options)
    for a, b in zip((eager.u, eager.du, eager.v), (traced.u, traced.du, traced.v)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len(rows_compiled._GRAPHS[model]) == 1


def test_a_model_with_activation_checkpointing_runs_the_eager_row_pass():
    """A trace would flatten torch.utils.checkpoint and keep every activation: the eager pass keeps the saving."""
    model = plain_dit(checkpoint=True)
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    with pytest.warns(UserWarning, match=r"runs eagerly: it uses activation checkpointing"):
        traced = step(model, compiled, x, labels)
    for a, b in zip(step(model, model, x, labels), traced):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.heavy
def test_the_row_pass_is_compiled_with_the_models_backend():
    seen = []

    def backend(graph, inputs):
        seen.append(sum(1 for node in graph.graph.nodes if node.op == "call_function"))
        return graph.forward

    model = plain_dit()
    step(model, torch.compile(model, backend=backend), *batch())
    assert len(seen) == 1 and seen[0] > 100  # the row pass's graph (the model itself never ran compiled)


@pytest.mark.heavy
def test_per_sample_dropout_is_traced_and_gives_the_eager_masks():
    """Under meanflow train's per-sample dropout the row pass is traced: the keys and the rows' global
    indices are inputs of the graph (no random op in it, so any backend gives the same masks), and the
    compiled step equals the eager one, mask for mask, for any step and rows; the masks do change."""
    ops = []

    def backend(graph, inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

    model = plain_dit(dropout=0.3)
    compiled = torch.compile(model, backend=backend)
    x, labels = batch()
    results = []
    for step_index, first_row in ((2, 6), (3, 0)):  # another step, and the other half of the global batch
        for net in (model, compiled):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no eager fallback
                with PerSampleDropout(50 + step_index, torch.arange(6) + first_row, 12):
                    results.append(step(model, net, x, labels))
    for eager, traced in (results[0:2], results[2:4]):
        for a, b in zip(eager, traced):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[0][2], results[2][2])  # other masks
    assert ops and not [op for op in ops if "rand" in op or "bernoulli" in op]  # the keys come in: no draw in the graph
    graphs = rows_compiled._GRAPHS[model]
    assert len(graphs) == 1 and callable(next(iter(graphs.values())))


@pytest.mark.heavy
def test_a_model_moved_to_another_dtype_is_traced_again():
    model = plain_dit()
    compiled = torch.compile(model, backend="aot_eager")
    x, labels = batch()
    step(model, compiled, x, labels)
    model.double()
    eager, traced = step(model, model, x.double(), labels), step(model, compiled, x.double(), labels)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(rows_compiled._GRAPHS[model]) == 2


class Conditioned(torch.nn.Module):
    """A user's model with two optional conditioning inputs of one shape, optional labels and a second head."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body, self.emb = torch.nn.Linear(6, 16), torch.nn.Embedding(4, 16)
        self.u, self.v = torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)

    def forward(self, z, r, t, labels=None, omega=None, scale=None, return_v=False):
        extra = (torch.zeros_like(t) if omega is None else omega) + (torch.zeros_like(t) if scale is None else scale.exp())
        h = self.body(torch.cat([z, r[:, None], (t * t)[:, None], extra[:, None]], dim=1))
        h = torch.tanh(h if labels is None else h + self.emb(labels))
        return (self.u(h), self.v(h)) if return_v else self.u(h)


@pytest.mark.heavy
def test_the_signature_tells_apart_conditioning_names_labels_tangents_and_heads():
    """Calls that differ only in a conditioning input's name, whether labels or a tangent on r are given, or
    whether the second head is asked for, each get their own graph, equal to the eager row pass; a call like an
    earlier one reuses its graph."""
    model = Conditioned()
    compiled = torch.compile(model, backend="aot_eager")
    z, t, w = torch.randn(6, 3), torch.rand(6), torch.rand(6)
    rows, dz, dr = torch.tensor([1, 4]), torch.randn(2, 3), torch.rand(2)
    calls = [
        {"labels": None, "tangent": Tangent(z=dz), "conditioning": {"omega": w}},
        {"labels": None, "tangent": Tangent(z=dz), "conditioning": {"scale": w}},
        {"labels": torch.arange(6) % 3, "tangent": Tangent(z=dz), "conditioning": {"omega": w}},
        {"labels": None, "tangent": Tangent(z=dz, r=dr), "conditioning": {"omega": w}},
        {"labels": None, "tangent": Tangent(z=dz), "conditioning": {"omega": w}, "return_v": True},
        {"labels": None, "tangent": Tangent(z=dz), "conditioning": {"omega": w + 1}},  # the first signature again
    ]
    for count, call in zip((1, 2, 3, 4, 5, 5), calls):
        options = dict(call)
        labels, tangent = options.pop("labels"), options.pop("tangent")
        eager = jvp(model, z, t * 0.5, t, labels, rows, tangent, mode="rows", **options)
        traced = jvp(compiled, z, t * 0.5, t, labels, rows, tangent, mode="rows", **options)
        assert len(rows_compiled._GRAPHS[model]) == count, call
        for a, b in zip((eager.u, eager.du, eager.v), (traced.u, traced.du, traced.v)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["forward_ad", "full"])
def test_forward_mode_on_a_compiled_model_moves_t_along_its_tangent(mode):
    """jvp="forward_ad" / "full" on a compiled model (torch.func.jvp through it) gives d/dt u along (v, 0, 1):
    torch.func.jvp of the plain model in float64, and along (0, 0, 1) the time derivative alone, which t * t in
    the model makes differ from zero."""
    model = Conditioned().double()
    compiled = torch.compile(model, backend="aot_eager")
    z, t = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, dtype=torch.float64) * 0.5 + 0.4
    r, rows, w = t * 0.5, torch.tensor([0, 3, 5]), torch.rand(6, dtype=torch.float64)

    def reference(dz: torch.Tensor) -> torch.Tensor:
        def fn(z_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            return model(z_, r[rows], t_, None, omega=w[rows])

        return torch.func.jvp(fn, (z[rows], t[rows]), (dz, torch.ones(3, dtype=torch.float64)))[1]

    for dz in (torch.randn(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)):
        out = jvp(compiled, z, r, t, None, rows, Tangent(z=dz), mode=mode, conditioning={"omega": w})
        torch.testing.assert_close(out.du, reference(dz), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.u, model(z, r, t, None, omega=w), rtol=1e-12, atol=1e-12)
        assert out.u.requires_grad and not out.du.requires_grad
    assert float(reference(torch.zeros(3, 3, dtype=torch.float64)).detach().abs().min()) > 1e-3
