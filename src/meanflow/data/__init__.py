"""Data floor (beside models, objectives, metrics): every source behind ``load_dataset(cfg, seed) ->
(train, reference)`` (:class:`~meanflow.data.base.Dataset`; reference = held-out data or None; docs/DATA.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import options as opts
from ..config import ConfigError, DataConfig
from .base import KINDS, Dataset, TensorDataset
from .images import load_digits, load_image_folder, load_npz_images, load_torchvision, random_flip, save_grid, to_uint8
from .latents import load_latent_dataset
from .points import load_points, save_points_plot
from .toy import TOY_DATASETS, sample_toy

# The reference set of a toy distribution is drawn from seed + REFERENCE_SEED_OFFSET, a stream that
# no training seed below 2**32 uses.
REFERENCE_SEED_OFFSET = 2**32

Loader = Callable[[DataConfig, int, str], tuple[TensorDataset, TensorDataset | None]]


def load_dataset(cfg: DataConfig, seed: int, root: str = "data") -> tuple[Dataset, Dataset | None]:
    """Build the training set and a held-out reference set (or None) for ``cfg.name``.

    ``seed`` fixes toy samples and the train/reference splits; ``root`` is the directory for
    torchvision data when ``cfg.path`` is not given. ``cfg.conditional=False`` drops the labels.
    """
    check_keys_read(cfg)
    train, reference = source(cfg.name).load(cfg, seed, root)
    if not cfg.conditional:
        train, reference = train.without_labels(), None if reference is None else reference.without_labels()
    return train, reference


def check_keys_read(cfg: DataConfig) -> None:
    """ConfigError for an unknown source, or a ``data.*`` key set away from its default that source
    ``cfg.name`` does not read."""
    chosen = source(cfg.name)
    for spec in dataclasses.fields(DataConfig):
        key, value = spec.name, getattr(cfg, spec.name)
        if key in ("name", "conditional", *chosen.reads) or value == spec.default:
            continue
        reads = ", ".join(f"data.{k}" for k in chosen.reads) or "no other data key"
        raise ConfigError(f"data.{key}={value!r} is not read by data.name={cfg.name} ({chosen.about}; it reads {reads}); "
                          f"{_likely_fix(key, value)}")


def _likely_fix(key: str, value) -> str:
    """The probable intent behind a key the chosen source ignores."""
    if key == "path":
        path = Path(str(value))
        guess = ("latents" if (path / "latents.json").exists() else "folder") if path.is_dir() else \
            {".npy": "points", ".npz": "points", ".csv": "points"}.get(path.suffix.lower())
        if guess:
            alternative = " (or data.name=npz for uint8 images)" if path.suffix.lower() in (".npy", ".npz") else ""
            return f"did you mean data.name={guess}{alternative}?"
    readers = sorted({"a toy distribution" if s is _TOY else n for n, s in sources().items() if key in s.reads})
    return f"remove data.{key}, or choose a data.name that reads it: {', '.join(readers)}"


def _subset(data: TensorDataset, index: torch.Tensor) -> TensorDataset:
    labels = None if data.labels is None else data.labels[index]
    return TensorDataset(data.x[index], labels, num_classes=data.num_classes, kind=data.kind, info=data.info)


def _split(data: TensorDataset, num_reference: int, seed: int) -> tuple[TensorDataset, TensorDataset | None]:
    """Hold out the last ``num_reference`` items of a seeded permutation (None when 0)."""
    if num_reference <= 0:
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return _subset(data, order[:-num_reference]), _subset(data, order[-num_reference:])


def _load_toy(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, TensorDataset | None]:
    info = {"source": cfg.name}
    train = TensorDataset(sample_toy(cfg.name, cfg.num_samples, torch.Generator().manual_seed(seed)), info=info)
    if cfg.holdout == 0:
        return train, None
    reference_x = sample_toy(cfg.name, cfg.holdout, torch.Generator().manual_seed(seed + REFERENCE_SEED_OFFSET))
    return train, TensorDataset(reference_x, info=info)


def _require_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise ValueError(f"data.name={cfg.name} needs data.path (the file or folder to read)")
    return Path(cfg.path)


def _load_points(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, TensorDataset | None]:
    path = _require_path(cfg)
    x, labels = load_points(path)
    num_classes = 0 if labels is None else int(labels.max()) + 1
    data = TensorDataset(x, labels, num_classes=num_classes, kind="points", info={"source": "points", "path": str(path)})
    return _split(data, min(cfg.holdout, len(data) // 5), seed)


def _load_digits(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, TensorDataset | None]:
    data = load_digits(cfg.image_size)
    return _split(data, len(data) // 5, seed)


def _load_folder(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, None]:
    return load_image_folder(_require_path(cfg), cfg.image_size), None


def _load_npz(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, None]:
    return load_npz_images(_require_path(cfg), cfg.image_size), None


def _load_torchvision(cfg: DataConfig, seed: int, root: str) -> tuple[TensorDataset, TensorDataset]:
    directory = cfg.path or root
    train = load_torchvision(cfg.name, directory, train=True, download=cfg.download, image_size=cfg.image_size)
    test = load_torchvision(cfg.name, directory, train=False, download=cfg.download, image_size=cfg.image_size)
    return train, test


def _load_latents(cfg: DataConfig, seed: int, root: str) -> tuple[Dataset, None]:
    return load_latent_dataset(_require_path(cfg), seed, cfg.image_size, cfg.flip, cfg.latent_norm), None


@dataclass(frozen=True)
class Source:
    """A data source: its loader, the ``data.*`` keys it reads (besides ``name`` and ``conditional``,
    read for all), a few words on what it is, for error messages, and the kind of data set it loads
    (``points``, ``images`` or ``latents``: what evaluation can score)."""

    load: Loader
    reads: tuple[str, ...]
    about: str
    kind: str = "images"


def sources() -> dict[str, Source]:
    """Every data source by ``data.name``, in registration order (the registry of :mod:`meanflow.options`)."""
    return opts.components("data")


def source(name: str) -> Source:
    """The source registered as ``name``; ConfigError listing the sources."""
    if name not in opts.kinds("data"):
        raise ConfigError(f"unknown data set {name!r}; choose one of {', '.join(opts.kinds('data'))}")
    return opts.lookup("data", name)


_IMAGE_KEYS = ("image_size", "flip", "augment")  # augment: EDM augmentation of pixels (trainer)
_TOY = Source(_load_toy, ("num_samples", "holdout"), "a built-in toy distribution", "points")
for _name in TOY_DATASETS:
    opts.register("data", _name, _TOY)
opts.register("data", "points", Source(_load_points, ("path", "holdout"), "points from a .npy/.npz/.csv file", "points"))
opts.register("data", "digits", Source(_load_digits, _IMAGE_KEYS, "scikit-learn's digits images"))
opts.register("data", "folder", Source(_load_folder, ("path", *_IMAGE_KEYS), "an image folder"))
opts.register("data", "npz", Source(_load_npz, ("path", *_IMAGE_KEYS), "images from a .npz/.npy file"))
opts.register("data", "cifar10", Source(_load_torchvision, ("path", "download", *_IMAGE_KEYS), "CIFAR-10 through torchvision"))
opts.register("data", "mnist", Source(_load_torchvision, ("path", "download", *_IMAGE_KEYS), "MNIST through torchvision"))
opts.register("data", "latents", Source(_load_latents, ("path", "image_size", "flip", "latent_norm"),
                                        "a VAE latent cache from meanflow encode", "latents"))

__all__ = [
    "KINDS",
    "TOY_DATASETS",
    "Dataset",
    "TensorDataset",
    "check_keys_read",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz_images",
    "load_points",
    "load_torchvision",
    "random_flip",
    "sample_toy",
    "source",
    "sources",
    "save_grid",
    "save_points_plot",
    "to_uint8",
]
