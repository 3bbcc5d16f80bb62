"""The latent cache as training data (``data.name=latents``): memory-mapped shards, a fresh seeded
posterior draw per request, normalised latents."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .layout import read_metadata
from .normalisation import IMF_LATENT_MEAN, IMF_LATENT_STD, NORMALISATIONS, normalise

POSTERIORS = ("sample", "mean")


class LatentDataset:
    """A latent cache as a :class:`~meanflow.data.base.Dataset` of kind ``"latents"``.

    ``get(index)`` returns float32 latents (B, C, h, w), normalised (:func:`normalise`), and
    int64 labels (B,). With ``posterior="sample"`` z is a fresh posterior draw ``mean + std * e`` of a
    randomly chosen view (image or mirror image, when the cache has both); the draw comes from a
    generator seeded by (seed, the requested indices), so the same request gives the same latents
    (a resumed run continues exactly) while the changing batch composition gives new noise every
    epoch. ``posterior="mean"`` returns the posterior mean of view 0, deterministically.
    Shards stay memory-mapped: only the requested rows are read.
    """

    kind = "latents"

    def __init__(self, path: str | Path, seed: int = 0, posterior: str = "sample", labels: bool = True, normalisation: str = "vae"):
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"latent normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.path, self.seed, self.posterior, self.normalisation = Path(path), seed, posterior, normalisation
        self.meta = read_metadata(self.path)
        self._shards = [self._open_shard(shard) for shard in self.meta["shards"]]
        self._offsets = np.cumsum([0] + [s["count"] for s in self.meta["shards"]])
        if self._offsets[-1] != self.meta["count"]:
            raise ValueError(f"latent cache {str(self.path)!r}: shards hold {self._offsets[-1]} images but the metadata says {self.meta['count']}")
        all_labels = torch.from_numpy(np.concatenate([np.load(self.path / s["labels"]) for s in self.meta["shards"]]).astype(np.int64))
        self.labels = all_labels if labels else None
        self.num_classes = int(self.meta["num_classes"]) if labels else 0
        self.sample_shape = tuple(int(s) for s in self._shards[0].shape[3:])
        self.scale, self.shift = float(self.meta["latent_scale"]), float(self.meta.get("latent_shift", 0.0))
        self.info = {"source": "latents", "vae": self.meta["vae"], "latent_scale": self.scale, "latent_shift": self.shift,
                     "image_size": self.meta["image_size"], "posterior": posterior, "latent_norm": normalisation}
        if normalisation == "imf":
            if self.sample_shape[0] != len(IMF_LATENT_MEAN):
                raise ValueError(f"latent_norm=imf has statistics for {len(IMF_LATENT_MEAN)} latent channels (SD-VAE) but the cache "
                                 f"{str(self.path)!r} has {self.sample_shape[0]}; use latent_norm=vae")
            self.info |= {"latent_mean": list(IMF_LATENT_MEAN), "latent_std": list(IMF_LATENT_STD)}

    def _open_shard(self, shard: dict[str, Any]) -> np.ndarray:
        """Memory-mapped (n, V, 2, C, h, w) fp16 moments of one shard, shape-checked."""
        file = self.path / shard["latents"]
        if not file.exists() or not (self.path / shard["labels"]).exists():
            raise FileNotFoundError(f"latent cache {str(self.path)!r} is missing shard files for {shard['latents']!r}; re-encode the images")
        try:
            array = np.load(file, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"latent shard {str(file)!r} is unreadable ({err}); re-encode the images") from err
        if array.ndim != 6 or array.shape[0] != shard["count"] or array.shape[1] != self.meta["views"] or array.shape[2] != 2:
            raise ValueError(f"latent shard {str(file)!r} has shape {array.shape}, expected ({shard['count']}, {self.meta['views']}, 2, C, h, w); re-encode the images")
        return array

    def __len__(self) -> int:
        return int(self.meta["count"])

    def without_labels(self) -> LatentDataset:
        """The same latents as an unconditional data set (labels None, num_classes 0)."""
        return LatentDataset(self.path, self.seed, self.posterior, labels=False, normalisation=self.normalisation)

    def get(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents (B, C, h, w) float32 and labels (B,) int64 (or None) of the items ``index`` (B,)."""
        rows = index.cpu().numpy().astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)}): got [{rows.min()}, {rows.max()}]")
        gen = torch.Generator().manual_seed(_request_seed(self.seed, rows))
        sample = self.posterior == "sample"
        views = (torch.rand(rows.size, generator=gen) < 0.5).numpy().astype(np.int64) if sample and self.meta["views"] == 2 else np.zeros(rows.size, np.int64)
        moments = torch.from_numpy(self._read(rows, views))  # (B, 2, C, h, w) fp16
        z = moments[:, 0].float()  # (B, C, h, w)
        if sample:
            z.addcmul_(moments[:, 1].float(), torch.randn(z.shape, generator=gen))
        labels = None if self.labels is None else self.labels[torch.from_numpy(rows)]
        return normalise(z, self.info), labels

    def _read(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """fp16 moments (B, 2, C, h, w) of global rows ``rows`` (B,) and views ``views`` (B,)."""
        out = np.empty((rows.size, 2, *self.sample_shape), dtype=np.float16)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == shard)
            order = pick[np.argsort(rows[pick])]  # read each shard in file order
            out[order] = self._shards[shard][rows[order] - self._offsets[shard], views[order]]
        return out


def _request_seed(seed: int, rows: np.ndarray) -> int:
    digest = hashlib.blake2b(np.int64(seed).tobytes() + rows.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def load_latent_dataset(path: str | Path, seed: int = 0, image_size: int | None = None, flip: bool = False,
                        normalisation: str = "vae") -> LatentDataset:
    """The training set behind ``data.name=latents``: checks the data options against the cache."""
    if flip:
        raise ValueError(
            "data.flip=true would mirror latent tensors, which is not the latent of the mirrored image; set "
            "data.flip=false and encode the mirror images with meanflow encode --flip (training then picks a view at random)"
        )
    data = LatentDataset(path, seed, normalisation=normalisation)
    if image_size is not None and image_size != data.meta["image_size"]:
        raise ValueError(f"data.image_size={image_size} but the latent cache {str(path)!r} was encoded at {data.meta['image_size']}; remove data.image_size or re-encode")
    return data
