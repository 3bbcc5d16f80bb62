"""Score image generators: digits-classifier metrics offline, FID / IS with Inception features.

Conventions (docs/EVALUATION.md): samples in [-1, 1] map to uint8 by clamp(round((x + 1) 127.5));
latent samples are decoded with the VAE recorded in the checkpoint first; EMA weights by default.
Under torchrun every process samples and featurises its share of the batches; the features are
gathered in batch order, so the numbers equal those of a single process.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.base import Dataset
from ..data.images import to_uint8
from ..metrics.digits_classifier import DigitsClassifier
from ..metrics.frechet import feature_statistics, frechet_distance, load_stats
from ..metrics.image_metrics import inception_score
from ..metrics.inception import InceptionFeatures
from ..runtime.distributed import DistInfo, gather_objects
from ..sampling import decode_samples, guidance_inputs, iterate_samples, nfe


NO_IMAGE_METRIC = ("no image metric applies without reference statistics: make them with `meanflow fid-stats SOURCE "
                   "--out REF.npz` and set eval.fid_stats=REF.npz (or pass --fid-stats REF.npz to meanflow eval) for "
                   "FID / IS; digits runs are scored by the digits classifier without them")


def image_metrics(data_name: str, fid_stats: str | None) -> tuple[str, ...]:
    """The feature spaces an image run is scored in: ``digits`` (digits data) and ``inception`` (with FID statistics)."""
    return (("digits",) if data_name == "digits" else ()) + (("inception",) if fid_stats else ())


def evaluate_images(
    model: nn.Module, meta: dict, train_set: Dataset, reference: Dataset | None, plan: list[tuple[str, int]],
    num: int, seed: int, info: DistInfo, fid_stats: str | None = None, inception_weights: str | None = None,
    batch_size: int = 500, save_samples: str | None = None, omega: float | None = None,
    interval: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Metrics for each (method, steps) of ``plan`` on ``num`` samples (classes cycled for conditional models).

    ``save_samples``: a path stem; the uint8 NHWC samples of each sampler are written to
    ``<stem>_<method>_<steps>nfe.npz`` (arrays ``samples`` and, when conditional, ``labels``).
    ``omega`` / ``interval``: guidance inputs of iMF-style models; each entry records the values used.
    Returns {name: metrics} on rank 0 and {} on the other ranks.
    """
    data = meta["data"]
    metrics = image_metrics(data["name"], fid_stats)
    if not metrics:
        raise ValueError(NO_IMAGE_METRIC)
    extractors = {}
    if "digits" in metrics:
        extractors["digits"] = DigitsClassifier.load_or_train()
    if "inception" in metrics:
        extractors["inception"] = InceptionFeatures(weights_path=inception_weights, device=info.device)
    real_stats = _digits_reference(extractors["digits"], reference or train_set) if "digits" in extractors else None
    results = {}
    for method, steps in plan:
        guidance = guidance_inputs(model, steps, omega, interval)
        features = _features(model, data, extractors, method, steps, num, seed, batch_size, info, keep=bool(save_samples), guidance=guidance)
        if info.is_main and save_samples:
            _save(f"{save_samples}_{method}_{steps}nfe.npz", features.pop("images"))
        if info.is_main:
            entry: dict[str, Any] = {"method": method, "nfe": nfe(steps, method)}
            if guidance:
                entry.update(omega=guidance["omega"], interval=[guidance["t_min"], guidance["t_max"]])
            if "digits" in features:
                entry.update(_digits_metrics(features["digits"], real_stats, len(reference or train_set)))
            if "inception" in features:
                entry.update(_inception_metrics(features["inception"], fid_stats))
            results[f"{method}_{steps}nfe"] = entry
    return results


def _features(model, data: dict, extractors: dict, method: str, steps: int, num: int, seed: int, batch_size: int,
              info: DistInfo, keep: bool = False, guidance: dict[str, float] | None = None) -> dict[str, Any]:
    """{extractor: {"pool": (N, D), "logits": (N, K), "labels": (N,) or None}} over all processes,
    plus "images": ((N, H, W, C) uint8, labels) when ``keep``. ``guidance``: from :func:`guidance_inputs`."""
    local = []
    options = {"omega": guidance["omega"], "interval": (guidance["t_min"], guidance["t_max"])} if guidance else {}
    for i, samples, labels in iterate_samples(model, num, tuple(data["sample_shape"]), steps, method,
                                              num_classes=data["num_classes"], seed=seed, batch_size=batch_size,
                                              device=info.device, progress=info.is_main, rank=info.rank,
                                              world_size=info.world_size, **options):
        if data["kind"] == "latents":
            samples = decode_samples(samples, data["info"], info.device)
        images = to_uint8(samples.cpu())  # (b, H, W, C)
        outs = {name: {k: v.float().cpu() for k, v in ex(images).items()} for name, ex in extractors.items()}
        local.append((i, outs, None if labels is None else labels.cpu(), images if keep else None))
    batches = sorted((b for part in gather_objects(local, info) for b in part), key=lambda b: b[0])
    merged = {}
    for name in extractors:
        merged[name] = {key: torch.cat([b[1][name][key] for b in batches]) for key in ("pool", "logits")}
        merged[name]["labels"] = None if batches[0][2] is None else torch.cat([b[2] for b in batches])
    if keep:
        merged["images"] = (torch.cat([b[3] for b in batches]), None if batches[0][2] is None else torch.cat([b[2] for b in batches]))
    return merged


def _save(path: str, images_and_labels) -> None:
    images, labels = images_and_labels
    arrays = {"samples": images.numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(path, **arrays)


def _digits_reference(classifier: DigitsClassifier, reference: Dataset):
    """(mu, sigma) of the real reference digits in the classifier's feature space."""
    real, _ = reference.get(torch.arange(len(reference)))
    return feature_statistics(classifier.features(real))


def _digits_metrics(features: dict, real_stats, num_reference: int) -> dict[str, float]:
    """Frechet distance to real digits in the classifier's features, and class accuracy (conditional)."""
    out = {"digits_fd": frechet_distance(*feature_statistics(features["pool"]), *real_stats), "reference_images": num_reference}
    if features["labels"] is not None:
        out["class_accuracy"] = (features["logits"].argmax(1) == features["labels"]).double().mean().item()
    return out


def _inception_metrics(features: dict, fid_stats: str) -> dict[str, float]:
    """FID against the reference statistics and Inception Score (10 splits)."""
    mean, std = inception_score(features["logits"])
    return {"fid": frechet_distance(*feature_statistics(features["pool"]), *load_stats(fid_stats)),
            "inception_score": mean, "inception_score_std": std, "num_samples": features["pool"].shape[0]}


__all__ = ["evaluate_images"]
