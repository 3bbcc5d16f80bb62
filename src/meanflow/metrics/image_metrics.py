"""Image-quality metrics on features: FID, Inception Score, and k-NN precision / recall.

A *feature extractor* is any callable mapping a uint8 image batch, (N, H, W, C) or (N, C, H, W), to a
dict with ``"pool"`` (N, D) features and ``"logits"`` (N, K) class logits: :class:`InceptionFeatures`
(Inception v3, the FID convention) and :class:`DigitsClassifier` (the project's small digits CNN)
both qualify. Generated samples in [-1, 1] are turned into uint8 first with
:func:`meanflow.data.to_uint8`, clamp(round((x + 1) * 127.5), 0, 255).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from .frechet import RunningStatistics, frechet_distance

ImageBatch = torch.Tensor | np.ndarray
# Budget of pairwise distances held at once by precision_recall (float64 entries, ~256 MB).
_DISTANCE_BLOCK = 2**25


class FeatureExtractor(Protocol):
    """uint8 images (N, H, W, C) or (N, C, H, W) -> {"pool": (N, D), "logits": (N, K)}."""

    def __call__(self, images: ImageBatch) -> dict[str, torch.Tensor]: ...


def images_to_nchw(images: ImageBatch) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) images with C in {1, 3} -> tensor (N, C, H, W), dtype kept.

    A batch is channels-first when dim 1 has 1 or 3 entries, else channels-last when the last dim has.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.permute(0, 3, 1, 2)
    raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(
            f"image metrics expect uint8 images, got {images.dtype}; convert samples in [-1, 1] with "
            "meanflow.data.to_uint8 (clamp(round((x + 1) * 127.5), 0, 255))"
        )


def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) from logits (N, K), in float64.

    Convention of Salimans et al. and the ADM evaluator: N samples cut in ``splits`` contiguous
    parts (no shuffling), the score computed per part; returns (mean, std) over the parts.
    """
    x = torch.as_tensor(logits).double()
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"need logits (N, K) with N >= splits = {splits}, got {tuple(x.shape)}")
    log_p = torch.log_softmax(x, dim=1)  # (N, K)
    n = x.shape[0]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]  # (n_i, K)
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # (K,) log mean p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)  # (n_i,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of features (N, D) to its k-th nearest other row. Returns (N,)."""
    block = max(1, _DISTANCE_BLOCK // features.shape[0])
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(block)]
    return torch.cat(radii)


def _covered(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query (Q, D) lies within radii (M,) of some support point (M, D). Returns bool (Q,)."""
    block = max(1, _DISTANCE_BLOCK // support.shape[0])
    inside = [(torch.cdist(chunk, support) <= radii).any(dim=1) for chunk in queries.split(block)]
    return torch.cat(inside)


def precision_recall(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    k: int = 3,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds, in float64.

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour within the set. Precision: fraction of fake samples inside the real
    manifold; recall: fraction of real samples inside the fake manifold.
    real_features: (N, D); fake_features: (M, D).
    """
    real = torch.as_tensor(real_features).to(device=device, dtype=torch.float64)
    fake = torch.as_tensor(fake_features).to(device=device, dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need features (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"each feature set needs more than k = {k} samples")
    precision = _covered(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _covered(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


def _extract(
    images: ImageBatch | Iterable[ImageBatch], extractor: FeatureExtractor, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Extractor outputs batch by batch. ``images``: one uint8 array (N, ...) cut into ``batch_size``
    batches, or an iterable of uint8 batches (B, ...), passed through."""
    batches = torch.as_tensor(images).split(batch_size) if isinstance(images, (torch.Tensor, np.ndarray)) else images
    for batch in batches:
        batch = images_to_nchw(batch)  # (B, C, H, W)
        _check_uint8(batch)
        yield extractor(batch)


def image_statistics(
    images: ImageBatch | Iterable[ImageBatch], extractor: FeatureExtractor, batch_size: int = 100
) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature statistics of uint8 images (as in :func:`compute_image_metrics`), streamed.

    Returns (mu (D,), sigma (D, D), number of images); mu and sigma float64, as saved by
    :func:`~meanflow.metrics.save_stats` for reference statistics.
    """
    stats = RunningStatistics()
    for out in _extract(images, extractor, batch_size):
        stats.update(out["pool"])
    return *stats.compute(), stats.count


def compute_image_metrics(
    images: ImageBatch | Iterable[ImageBatch],
    reference_stats: tuple[np.ndarray, np.ndarray] | None,
    extractor: FeatureExtractor,
    batch_size: int = 100,
    reference_features: torch.Tensor | np.ndarray | None = None,
    splits: int = 10,
    k: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """FID, Inception Score and (optionally) precision / recall of uint8 images.

    images: one uint8 array (N, H, W, C) / (N, C, H, W), cut into ``batch_size`` batches, or an
        iterable of such batches (e.g. a generator sampling on the fly).
    reference_stats: (mu (D,), sigma (D, D)) of the reference set in the extractor's feature space
        (see :func:`~meanflow.metrics.load_stats`); None skips FID.
    reference_features: (N_ref, D) reference features; when given, precision / recall (k-NN) too,
        with pairwise distances computed on ``device`` (default: CUDA when available).
    Returns {"fid", "inception_score", "inception_score_std", "num_samples"[, "precision", "recall"]}.
    """
    stats = RunningStatistics()
    logits, pool = [], []
    for out in _extract(images, extractor, batch_size):
        stats.update(out["pool"])
        logits.append(out["logits"].float().cpu())
        if reference_features is not None:
            pool.append(out["pool"].float().cpu())
    if stats.count == 0:
        raise ValueError("no images were given")
    metrics = {"num_samples": stats.count}
    if reference_stats is not None:
        metrics["fid"] = frechet_distance(*stats.compute(), *reference_stats)
    metrics["inception_score"], metrics["inception_score_std"] = inception_score(torch.cat(logits), splits)
    if reference_features is not None:
        metrics["precision"], metrics["recall"] = precision_recall(
            reference_features, torch.cat(pool), k, device or ("cuda" if torch.cuda.is_available() else "cpu")
        )
    return metrics
