"""A small digits CNN the project trains itself: a cheap, offline stand-in for Inception on digits.

Inception features say little about 16 x 16 grayscale digits and need a 100 MB download; this
classifier trains deterministically on scikit-learn's digits (CPU, fixed seed, a few seconds) and is
cached under ``$MEANFLOW_CACHE`` (default ``~/.cache/meanflow``) in a file named by a hash of its
settings, so it trains once per machine. Its penultimate activations play the role of Inception's
pool features: :func:`digits_frechet` is an "FID" in that space, and the classifier is a
:class:`~meanflow.metrics.FeatureExtractor`, so :func:`~meanflow.metrics.compute_image_metrics`
works with it (the Inception Score becomes the usual "classifier score" over 10 classes).

Images are (N, 1, S, S) floats in [-1, 1] (the data pipeline's convention) or uint8 in any layout
accepted by :func:`~meanflow.metrics.images_to_nchw`; other sizes are resized bilinearly to the
classifier's native size, RGB is averaged to grayscale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.images import load_digits
from ..runtime.files import atomic_path
from .frechet import feature_statistics, frechet_distance
from .image_metrics import ImageBatch, images_to_nchw

CACHE_ENV = "MEANFLOW_CACHE"
NUM_CLASSES = 10
# Bump when the architecture or the training recipe changes: it invalidates cached weights.
_RECIPE_VERSION = 1
_INFERENCE_BATCH = 1024


class _DigitsNet(nn.Module):
    """Two conv blocks and an MLP head. Input (B, 1, S, S) in [-1, 1]; any S >= 4."""

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)  # (B, feature_dim)
        return features, self.head(features)  # (B, feature_dim), (B, 10)


def default_cache_dir() -> Path:
    """``$MEANFLOW_CACHE`` or ``~/.cache/meanflow``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "meanflow")


def digits_split(size: int = 16, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn digits through the data pipeline (:func:`meanflow.data.load_digits`), split by a
    seeded permutation. Returns (x_train, y_train, x_test, y_test): x float (n, 1, size, size) in
    [-1, 1], y int64 (n,)."""
    data = load_digits(size)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    num_test = int(round(holdout * len(data)))
    x, y = data.get(order)
    return x[num_test:], y[num_test:], x[:num_test], y[:num_test]


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded global RNG, deterministic kernels and one CPU thread inside; the caller's settings are
    restored after. One thread makes reductions run in a fixed order whatever the machine's core
    count, and this tiny net trains faster on one thread than on OpenMP threads competing for cores."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.set_num_threads(previous[1])


def _shifted(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels per image (background -1 fills). (B, 1, S, S)."""
    batch, size = x.shape[0], x.shape[-1]
    padded = F.pad(x[:, 0], (max_shift,) * 4, value=-1.0)  # (B, S + 2m, S + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), generator=gen)  # row / column offsets
    rows, cols = offsets[0] + torch.arange(size), offsets[1] + torch.arange(size)  # (B, S) each
    return padded[torch.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]


class DigitsClassifier:
    """Frozen digits CNN; see the module docstring. Build with :meth:`load_or_train` or :meth:`train`."""

    def __init__(self, net: nn.Module, settings: dict, heldout_accuracy: float) -> None:
        self.net = net.eval().requires_grad_(False)
        self.settings = settings
        self.size = settings["size"]
        self.heldout_accuracy = heldout_accuracy

    @staticmethod
    def default_settings(size: int = 16, seed: int = 0) -> dict:
        """The training recipe: native size, seed, optimisation and architecture settings."""
        return {"size": size, "seed": seed, "epochs": 15, "batch_size": 64, "lr": 2e-3, "width": 32,
                "feature_dim": 128, "holdout": 0.2, "version": _RECIPE_VERSION}

    @classmethod
    def train(cls, size: int = 16, seed: int = 0) -> DigitsClassifier:
        """Train from scratch on one CPU thread (bit-identical weights on reruns with the same torch build)."""
        settings = cls.default_settings(size, seed)
        x_train, y_train, x_test, y_test = digits_split(size, settings["holdout"], seed)
        with _deterministic(seed):
            net = _DigitsNet(settings["width"], settings["feature_dim"])
            optimizer = torch.optim.Adam(net.parameters(), lr=settings["lr"])
            gen = torch.Generator().manual_seed(seed)
            for _ in range(settings["epochs"]):
                for index in torch.randperm(len(x_train), generator=gen).split(settings["batch_size"]):
                    _, logits = net(_shifted(x_train[index], gen))  # (B, 10)
                    loss = F.cross_entropy(logits, y_train[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        classifier = cls(net, settings, heldout_accuracy=0.0)
        classifier.heldout_accuracy = classifier.accuracy(x_test, y_test)
        return classifier

    @classmethod
    def load_or_train(cls, size: int = 16, seed: int = 0, cache_dir: str | Path | None = None) -> DigitsClassifier:
        """The cached classifier for these settings, training (a few seconds) and caching it if absent."""
        settings = cls.default_settings(size, seed)
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir or default_cache_dir()) / f"digits_classifier_{key}.safetensors"
        if path.is_file():
            with safe_open(str(path), "pt") as handle:
                accuracy = float(handle.metadata()["heldout_accuracy"])
            net = _DigitsNet(settings["width"], settings["feature_dim"])
            net.load_state_dict(load_file(str(path)))
            return cls(net, settings, accuracy)
        classifier = cls.train(size, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"settings": json.dumps(settings), "heldout_accuracy": repr(classifier.heldout_accuracy)}
        with atomic_path(path) as partial:  # concurrent runs never see half a file
            save_file(classifier.net.state_dict(), str(partial), metadata=metadata)
        return classifier

    def _prepare(self, images: ImageBatch) -> torch.Tensor:
        """Images (see module docstring) -> float (N, 1, size, size) in [-1, 1]."""
        x = images_to_nchw(images)  # (N, C, H, W)
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        x = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def _forward(self, images: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._prepare(images)  # (N, 1, size, size)
        outputs = [self.net(chunk) for chunk in x.split(_INFERENCE_BATCH)]
        return torch.cat([f for f, _ in outputs]), torch.cat([logit for _, logit in outputs])

    def features(self, images: ImageBatch) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        return self._forward(images)[0]

    def logits(self, images: ImageBatch) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self._forward(images)[1]

    def predict(self, images: ImageBatch) -> torch.Tensor:
        """Predicted labels, int64 (N,)."""
        return self.logits(images).argmax(dim=1)

    def accuracy(self, images: ImageBatch, labels: torch.Tensor) -> float:
        """Fraction of images (N, ...) whose predicted label equals ``labels`` (N,)."""
        return (self.predict(images) == torch.as_tensor(labels)).double().mean().item()

    def __call__(self, images: ImageBatch) -> dict[str, torch.Tensor]:
        """The :class:`~meanflow.metrics.FeatureExtractor` interface: {"pool": (N, D), "logits": (N, 10)}."""
        features, logits = self._forward(images)
        return {"pool": features, "logits": logits}


def digits_frechet(
    images: ImageBatch, reference_images: ImageBatch, classifier: DigitsClassifier | None = None
) -> float:
    """Frechet distance between images (N, ...) and reference images (M, ...) in the digits
    classifier's feature space (default: :meth:`DigitsClassifier.load_or_train` at size 16)."""
    classifier = classifier or DigitsClassifier.load_or_train()
    stats = [feature_statistics(classifier.features(x)) for x in (images, reference_images)]
    return frechet_distance(*stats[0], *stats[1])
