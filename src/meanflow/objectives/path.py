"""The linear (rectified) probability path used by MeanFlow and Flow Matching.

Time convention, fixed across the package: t = 0 is data, t = 1 is noise.

    z_t = (1 - t) x + t e,        v_t = dz_t / dt = e - x
"""
from __future__ import annotations

import torch

from ..options import Option
from ..runtime.distributed import gather_rows
from .draws import Shard


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like`` of shape (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x + t e.  x, noise: (B, ...); t: (B,). Returns (B, ...)."""
    tt = _expand(t, x)
    return (1 - tt) * x + tt * noise


def conditional_velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v_t = e - x, the velocity of the conditional path (independent of t). Shapes (B, ...)."""
    return noise - x


def marginal_velocity(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                      null: int = -1, points: torch.Tensor | None = None,
                      point_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Estimate of the marginal velocity E[e - x | z_t] from the batch's data points; (B, ...) in x's dtype.

    Each candidate point x_j (``points`` (M, ...), by default the batch x itself; it must hold every
    x_i) is a possible source of z_i = (1 - t_i) x_i + t_i e_i, weighted by the path's likelihood,
    w_ij = softmax_j( -||z_i - (1 - t_i) x_j||^2 / (2 t_i^2) ) (only points of the same label where
    ``labels`` (B,) and ``point_labels`` (M,) are given; a row whose label is ``null`` uses all
    points), and E[x | z_i] ~ x_hat_i = sum_j w_ij x_j, so that

        v_hat_i = (z_i - x_hat_i) / t_i = (e_i - x_i) + (x_i - x_hat_i) / t_i.

    This is the self-normalised estimator of stable target fields (Xu et al., 2023): consistent in
    the number of points, with far less variance than e - x where several data points could have
    led to z_i. The weights are computed in float64; as t -> 0 they concentrate on x_i and
    v_hat -> e - x. x, noise: (B, ...); t: (B,).
    """
    b = x.shape[0]
    xs = x.reshape(b, -1).double()  # (B, D)
    ps = xs if points is None else points.reshape(points.shape[0], -1).double()  # (M, D)
    es = noise.reshape(b, -1).double()  # (B, D)
    tt = t.double().clamp_min(1e-12)[:, None]  # (B, 1)
    a = 1 - tt  # (B, 1)
    z = a * xs + tt * es  # (B, D)
    sq = z.pow(2).sum(1, keepdim=True) - 2 * a * (z @ ps.T) + a.pow(2) * ps.pow(2).sum(1)  # (B, M): ||z_i - a_i x_j||^2
    logits = -sq / (2 * tt.pow(2))
    if labels is not None:
        others = labels if point_labels is None else point_labels  # (M,)
        allowed = (labels[:, None] == others[None, :]) | (labels[:, None] == null)  # (B, M)
        logits = logits.masked_fill(~allowed, float("-inf"))
    x_hat = torch.softmax(logits, dim=1) @ ps  # (B, D)
    v_hat = (es - xs) + (xs - x_hat) / tt
    return v_hat.reshape(x.shape).to(x.dtype)


#: the velocity that the target regresses: per sample (the papers'), or the batch estimate of the marginal
VELOCITIES = ("conditional", "batch")


class VelocityOptions:
    """Which velocity of the path the objective regresses (mixin of objectives)."""

    velocity = Option(
        "conditional", choices=VELOCITIES, doc="conditional = e - x per sample (the papers'); batch = the marginal "
        "velocity E[e - x | z_t] estimated over the global batch's data points (marginal_velocity): lower-variance "
        "targets for low-dimensional data such as 2-D point clouds, no gain in high dimension",
    )

    def path_velocity(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                      null: int, shard: Shard | None = None) -> torch.Tensor:
        """The velocity chosen by ``velocity``, (B, ...); labels (B,) as fed to the network (null where dropped).

        With ``batch`` on one of several processes (``shard`` of a larger global batch) the candidate
        points are the global batch, gathered from every process: the same estimate as on one process.
        """
        if self.velocity == "conditional":
            return conditional_velocity(x, noise)
        if shard is None or shard.total in (None, x.shape[0]):
            return marginal_velocity(x, noise, t, labels, null)
        points = gather_rows(x)
        if points.shape[0] != shard.total:
            raise ValueError(f"velocity=batch needs the global batch of {shard.total} samples, gathered "
                             f"{points.shape[0]} from the processes: start the process group (torchrun) with one "
                             "equal shard per process, or use velocity=conditional")
        point_labels = None if labels is None else gather_rows(labels)
        return marginal_velocity(x, noise, t, labels, null, points, point_labels)
