"""Data floor (beside models, objectives, metrics): every source behind ``load_dataset(cfg, seed) ->
(train, reference)`` (:class:`~meanflow.data.base.Dataset`; reference = held-out data or None; docs/DATA.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import DataConfig
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
    if cfg.name not in _LOADERS:
        raise ValueError(f"unknown data set {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    train, reference = _LOADERS[cfg.name](cfg, seed, root)
    if not cfg.conditional:
        train, reference = train.without_labels(), None if reference is None else reference.without_labels()
    return train, reference


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


_LOADERS: dict[str, Loader] = {
    **{name: _load_toy for name in TOY_DATASETS},
    "points": _load_points,
    "digits": _load_digits,
    "folder": _load_folder,
    "npz": _load_npz,
    "cifar10": _load_torchvision,
    "mnist": _load_torchvision,
    "latents": _load_latents,
}
DATASETS = tuple(_LOADERS)

__all__ = [
    "DATASETS",
    "KINDS",
    "TOY_DATASETS",
    "Dataset",
    "TensorDataset",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz_images",
    "load_points",
    "load_torchvision",
    "random_flip",
    "sample_toy",
    "save_grid",
    "save_points_plot",
    "to_uint8",
]
