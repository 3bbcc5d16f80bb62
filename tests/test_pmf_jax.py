"""The pMF loss against the official ``pixelMeanFlow.forward`` lines run in JAX (jax.jvp), on the same weights and draws.

The official module draws its own randomness with flax RNG streams; here its loss lines (from ``v_t = ...``
to ``loss.mean()``, perceptual terms off) take our draws as inputs, with its r = t rows and dropped labels
wherever our draws put them (the official code puts both first in the batch; the loss is a mean over rows).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from meanflow.objectives import PMFLoss

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

CLASSES, D = 3, 12  # images (B, 3, 2, 2), flattened to D values


class TinyXPred(nn.Module):
    """x-prediction two-head MLP with the official output u = (z - x_net) / clip(t, 0.05, 1)."""

    guidance_input = True
    num_classes = CLASSES
    noise_scale = 2.0

    def __init__(self):
        super().__init__()
        self.inp, self.emb = nn.Linear(D + 4, 16), nn.Embedding(CLASSES + 1, 16)
        self.u_out, self.v_out = nn.Linear(16, D), nn.Linear(16, D)

    def forward(self, z, r, t, labels=None, *, omega, t_min, t_max, return_v=False):
        feats = torch.cat([z.flatten(1), (t - r)[:, None], (1 - 1 / omega)[:, None], t_min[:, None], t_max[:, None]], 1)
        trunk = torch.tanh(self.inp(feats) + self.emb(labels))
        scale = t.clamp(0.05, 1.0)[:, None]
        u = (z.flatten(1) - self.u_out(trunk)) / scale
        v = (z.flatten(1) - self.v_out(trunk)) / scale
        return (u.view_as(z), v.view_as(z)) if return_v else u.view_as(z)


def _net_jax(p):
    """The same network in JAX with the official call signature net(x, t, h, omega, t_min, t_max, y) -> (u, v)."""
    def net(x, t, h, w, t_min, t_max, y):
        feats = jnp.concatenate([x.reshape(x.shape[0], -1), h[:, None], (1 - 1 / w)[:, None], t_min[:, None], t_max[:, None]], 1)
        trunk = jnp.tanh(feats @ p["inp.weight"].T + p["inp.bias"] + p["emb.weight"][y])
        scale = jnp.clip(t, 0.05, 1.0)[:, None]
        flat = x.reshape(x.shape[0], -1)
        u = (flat - (trunk @ p["u_out.weight"].T + p["u_out.bias"])) / scale
        v = (flat - (trunk @ p["v_out.weight"].T + p["v_out.bias"])) / scale
        return u.reshape(x.shape), v.reshape(x.shape)
    return net


def _official_loss(net, images, labels, t, r, fm_mask, e, omega, t_min, t_max, drop_mask, num_classes, norm_eps=0.01, norm_p=1.0):
    """Lines of the official pixelMeanFlow.forward / guidance_fn / cond_drop, with the draws given."""
    x = images
    bz = x.shape[0]
    t4, r4, fm4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1), fm_mask.reshape(-1, 1, 1, 1)
    z_t = (1 - t4) * x + t4 * e
    v_t = (z_t - x) / jnp.clip(t4, 0.05, 1.0)

    def u_fn(x_, t_, h_, w_, t_min_, t_max_, y_):
        return net(x_, t_.reshape(bz), h_.reshape(bz), w_.reshape(bz), t_min_.reshape(bz), t_max_.reshape(bz), y_)

    def v_cond_fn(x_, t_, w_, y_):
        return u_fn(x_, t_, jnp.zeros_like(t_), w_, jnp.zeros_like(t_), jnp.ones_like(t_), y_)[1]

    # guidance_fn (v_fn runs the conditional and null calls as one doubled batch; the values are per row)
    v_c, v_u = v_cond_fn(z_t, t, omega, labels), v_cond_fn(z_t, t, jnp.ones_like(omega), jnp.full_like(labels, num_classes))
    w4 = omega.reshape(-1, 1, 1, 1)
    v_g_fm = v_t + (1 - 1 / w4) * (v_c - v_u)
    w = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)
    v_c = v_cond_fn(z_t, t, w, labels)
    v_g = v_t + (1 - 1 / w.reshape(-1, 1, 1, 1)) * (v_c - v_u)
    v_g = jnp.where(fm4, v_g_fm, v_g)
    # cond_drop
    labels = jnp.where(drop_mask, num_classes, labels)
    v_g = jnp.where(drop_mask.reshape(-1, 1, 1, 1), v_t, v_g)

    def u_jvp(z_, t_, r_):
        u, v = u_fn(z_, t_, t_ - r_, omega, t_min, t_max, labels)
        return u, v

    u, du_dt, v = jax.jvp(u_jvp, (z_t, t, r), (v_c, jnp.ones_like(t), jnp.zeros_like(t)), has_aux=True)
    V = u + (t4 - r4) * jax.lax.stop_gradient(du_dt)
    v_g = jax.lax.stop_gradient(v_g)

    def adp_wt_fn(loss):
        return loss / jax.lax.stop_gradient((loss + norm_eps) ** norm_p)

    loss_u = adp_wt_fn(jnp.sum((V - v_g) ** 2, axis=(1, 2, 3)))
    loss_v = adp_wt_fn(jnp.sum((v - v_g) ** 2, axis=(1, 2, 3)))
    return (loss_u + loss_v).mean()


def test_loss_and_gradients_equal_the_official_lines_in_jax():
    torch.manual_seed(0)
    net = TinyXPred()
    x, y = torch.rand(16, 3, 2, 2) * 2 - 1, torch.randint(0, CLASSES, (16,))
    loss_fn = PMFLoss(mu=0.0, sigma=0.8, uniform_fraction=0.3)
    out = loss_fn.targets(net, x, y, torch.Generator().manual_seed(4))
    loss = loss_fn.reduce(out)[0]
    grads = torch.autograd.grad(loss, list(net.parameters()))
    d, c = out.draws, out.draws.conditioning
    assert bool(d.dropped.any())
    a = lambda v: jnp.asarray(v.detach().numpy())  # noqa: E731
    params = {k: a(v) for k, v in net.named_parameters()}
    draws = dict(t=a(d.t), r=a(d.r), fm_mask=a(~d.jvp_rows), e=a(d.noise), omega=a(c["omega"]), t_min=a(c["t_min"]),
                 t_max=a(c["t_max"]), drop_mask=a(d.dropped))
    value, jax_grads = jax.value_and_grad(
        lambda p: _official_loss(_net_jax(p), a(x), a(y), num_classes=CLASSES, **draws))(params)
    np.testing.assert_allclose(float(loss), float(value), rtol=2e-5)
    for (name, _), g in zip(net.named_parameters(), grads):
        np.testing.assert_allclose(g.numpy(), np.asarray(jax_grads[name]), rtol=2e-3, atol=2e-5, err_msg=name)
