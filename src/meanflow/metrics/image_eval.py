"""Score image generators: digits-classifier metrics offline, FID / IS with Inception features.

Conventions (docs/EVALUATION.md): samples in [-1, 1] map to uint8 by clamp(round((x + 1) 127.5));
latent samples are decoded with the VAE recorded in the checkpoint first; EMA weights by default.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..data.base import Dataset
from ..data.images import to_uint8
from .digits_classifier import DigitsClassifier
from .frechet import feature_statistics, frechet_distance, load_stats
from .image_metrics import compute_image_metrics


def evaluate_images(
    model: nn.Module, meta: dict, train_set: Dataset, reference: Dataset | None, plan: list[tuple[str, int]],
    num: int, seed: int, device, fid_stats: str | None = None, inception_weights: str | None = None, batch_size: int = 500,
) -> dict[str, Any]:
    """Metrics for each (method, steps) of ``plan`` on ``num`` samples (classes cycled for conditional models)."""
    from .evaluate import iterate_samples

    data = meta["data"]
    digits = _digits_scorer(data, reference or train_set) if data["name"] == "digits" else None
    inception = _inception(inception_weights, device) if fid_stats else None
    ref_stats = load_stats(fid_stats) if fid_stats else None
    results = {}
    for method, steps in plan:
        batches = iterate_samples(model, num, tuple(data["sample_shape"]), steps, method, num_classes=data["num_classes"],
                                  seed=seed, batch_size=batch_size, device=device, progress=True)
        images, labels = _collect_uint8(batches, data)
        entry: dict[str, Any] = {"method": method, "nfe": steps if method != "heun" else 2 * steps - 1}
        if digits is not None:
            entry.update(digits(images, labels))
        if inception is not None:
            entry.update(compute_image_metrics(images, ref_stats, inception, batch_size=min(batch_size, 200)))
        results[f"{method}_{steps}nfe"] = entry
    return results


def _collect_uint8(batches: Iterator, data: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode (latents) and map each batch to uint8 NHWC on the CPU; (N, H, W, C), labels (N,)."""
    from .evaluate import decode_samples

    images, labels = [], []
    for samples, y in batches:
        if data["kind"] == "latents":
            samples = decode_samples(samples, data["info"], samples.device)
        images.append(to_uint8(samples.cpu()))
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(images), (torch.cat(labels) if labels else None)


def _digits_scorer(data: dict, reference: Dataset):
    """Class accuracy (conditional) and Frechet distance in the project's digits-classifier features."""
    classifier = DigitsClassifier.load_or_train()
    real, _ = reference.get(torch.arange(len(reference)))
    real_stats = feature_statistics(classifier.features(real))

    def score(images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        out = {"digits_fd": frechet_distance(*feature_statistics(classifier.features(images)), *real_stats),
               "reference_images": len(reference)}
        if labels is not None:
            out["class_accuracy"] = classifier.accuracy(images, labels)
        return out

    return score


def _inception(weights: str | None, device):
    from .inception import InceptionFeatures

    return InceptionFeatures(weights_path=weights, device=device)


__all__ = ["evaluate_images"]
