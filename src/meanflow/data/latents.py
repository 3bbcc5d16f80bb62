"""SD-VAE latent caches: encode an image folder once, train on the latents, decode samples.

Pipeline (see docs/LATENTS.md):

1. :func:`encode_folder` (``meanflow encode``) reads an image folder in ImageNet layout (one
   sub-folder per class, labels follow the sorted folder names), applies ADM's centre crop
   (:func:`adm_center_crop`), and encodes every image with a diffusers ``AutoencoderKL`` into
   sharded ``.npy`` files plus a ``latents.json`` metadata file.
2. :class:`LatentDataset` (``data.name=latents``, ``data.path=<cache>``) memory-maps the shards and
   returns normalised latents as float32: ``(z - shift) * scale`` with the VAE's scaling factor
   (``data.latent_norm=vae``) or iMF's per-channel ``(z - mean_c) / std_c`` (``data.latent_norm=imf``).
3. :func:`decode` maps generated latents back to images in [-1, 1] with the recorded VAE.

What is stored: the *moments* of the VAE posterior N(mean, std^2), not a single draw. Each image
becomes an fp16 array (views, 2, C, h, w): ``[:, 0]`` the posterior mean, ``[:, 1]`` its std; view 0
is the image, view 1 (with ``--flip``) its mirror image encoded separately (flipping a latent is not
the latent of the flipped image). Training draws a fresh posterior sample ``mean + std * e`` and a
random view each time an image is used, which matches DiT / MeanFlow training with on-the-fly
encoding at twice the storage of a single stored draw.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import LATENT_NORMALISATIONS
from ..runtime.files import atomic_path
from .images import _list_image_files, _open_image

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
METADATA_FILE = "latents.json"
FORMAT = "meanflow-latents"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 10_000
POSTERIORS = ("sample", "mean")
# How latents are normalised for the network: "vae" (z - shift) * scale with the VAE's own scaling
# factor (DiT, MeanFlow), or "imf": per-channel (z - mean_c) / std_c with the statistics of the
# official iMF code (utils/vae_util.py, SD-VAE ft-mse latents of ImageNet 256).
NORMALISATIONS = LATENT_NORMALISATIONS
IMF_LATENT_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMF_LATENT_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VAE_CACHE: dict[tuple[str, str], Any] = {}


# --------------------------------------------------------------------------- preprocessing


def adm_center_crop(image, size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to (size, size, 3) uint8 RGB.

    While the shorter side is at least 2 * size, halve the image with a BOX filter (cheap
    anti-aliasing); then resize with BICUBIC so the shorter side is exactly ``size``; then cut the
    central size x size square.
    """
    from PIL import Image

    if size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # (H', W', 3), min(H', W') == size
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> (uint8 (3, S, S) tensor, position), for a DataLoader with worker processes."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        array = adm_center_crop(_open_image(self.files[i]), self.size)  # (S, S, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), i


# --------------------------------------------------------------------------- VAE


def load_vae(name_or_path: str, device: str | torch.device = "cpu"):
    """A diffusers ``AutoencoderKL`` in eval mode on ``device``, cached per (name, device).

    ``name_or_path``: a local directory saved with ``save_pretrained``, a single weights file
    (.safetensors / .ckpt / .pt, loaded with ``from_single_file``), or a Hugging Face hub id such as
    ``stabilityai/sd-vae-ft-mse`` (needs network access or the Hugging Face cache).
    """
    key = (str(name_or_path), str(torch.device(device)))
    if key not in _VAE_CACHE:
        _VAE_CACHE[key] = _load_vae_uncached(str(name_or_path)).to(device).eval().requires_grad_(False)
    return _VAE_CACHE[key]


def _load_vae_uncached(name: str):
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise RuntimeError("latent data needs diffusers; install it with pip install 'meanflow[latent]'") from err
    path = Path(name).expanduser()
    if not path.exists() and not _HUB_ID.match(name):
        raise FileNotFoundError(f"VAE path {name!r} does not exist; pass a directory saved with save_pretrained, a weights file, or a hub id such as {DEFAULT_VAE}")
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path))
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as err:
        if path.exists():
            raise RuntimeError(f"cannot load a diffusers AutoencoderKL from {name!r}: {err}") from err
        raise RuntimeError(
            f"cannot load the VAE {name!r}: there is no local folder of that name, and loading it from the Hugging Face hub "
            f"failed (no network and not in the Hugging Face cache?): "
            f"{str(err).rstrip('.')}. Download it once where there is network (huggingface-cli download {name} --local-dir vae) and pass "
            f"the local directory: meanflow encode ... --vae ./vae"
        ) from err


def _vae_reference(name: str) -> str:
    """What the metadata records: an absolute path for local VAEs, else the hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _latent_normalisation(vae) -> tuple[float, float]:
    """(scale, shift) with which latents are normalised: (z - shift) * scale (diffusers' convention)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return scale, shift


@torch.no_grad()
def _encode_moments(vae, images: torch.Tensor, flip: bool, device: torch.device) -> np.ndarray:
    """uint8 images (B, 3, S, S) -> fp16 posterior moments (B, V, 2, C, h, w); V = 2 with the mirror view."""
    x = images.to(device).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
    if flip:
        x = torch.cat([x, x.flip(-1)])  # (2B, 3, S, S)
    posterior = vae.encode(x).latent_dist
    moments = torch.stack([posterior.mean, posterior.std], dim=1)  # (VB, 2, C, h, w)
    views = 2 if flip else 1
    moments = moments.unflatten(0, (views, images.shape[0])).transpose(0, 1)  # (B, V, 2, C, h, w)
    return moments.to(torch.float16).cpu().numpy()


# --------------------------------------------------------------------------- encoding


def encode_folder(
    source: str | Path, out: str | Path, vae: str = DEFAULT_VAE, image_size: int = 256, flip: bool = False,
    batch_size: int = 64, shard_size: int = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu",
    num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Encode the images under ``source`` into a latent cache in ``out``; return its metadata.

    Shards are written atomically (temporary file + rename); ``latents.json`` is written first with
    ``"complete": false`` and rewritten at the end. Running the same command again after an
    interruption keeps the finished shards and encodes the rest.
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {str(source)!r} does not exist")
    for name, value in (("image size", image_size), ("batch size", batch_size), ("shard size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    files, labels, classes = _list_image_files(source)
    fingerprint = _fingerprint(source, files, labels, vae, image_size, flip, shard_size)
    resuming = _check_out(out, fingerprint)
    device = torch.device(device)
    model = load_vae(vae, device)
    scale, shift = _latent_normalisation(model)
    counts = [min(shard_size, len(files) - start) for start in range(0, len(files), shard_size)]
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False, "vae": _vae_reference(vae),
        "latent_scale": scale, "latent_shift": shift, "image_size": image_size, "preprocessing": "adm_center_crop",
        "posterior": "moments", "views": 2 if flip else 1, "dtype": "float16", "count": len(files),
        "num_classes": len(classes), "classes": classes, "source": str(source.resolve()), "fingerprint": fingerprint,
        "shards": [{"latents": f"shard-{k:05d}.npy", "labels": f"shard-{k:05d}.labels.npy", "count": n} for k, n in enumerate(counts)],
    }
    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / METADATA_FILE, meta)
    pending = [k for k, shard in enumerate(meta["shards"]) if not _shard_done(out, shard)]
    _encode_shards(model, files, labels, pending, meta, out, batch_size, shard_size, device, num_workers, progress)
    meta["latent_shape"] = list(np.load(out / meta["shards"][0]["latents"], mmap_mode="r").shape[3:])
    meta["complete"] = True
    _write_json(out / METADATA_FILE, meta)
    return meta


def _fingerprint(source: Path, files: list[Path], labels: list[int], vae: str, size: int, flip: bool, shard_size: int) -> str:
    """Hash of everything that fixes the cache contents (file list, labels, settings)."""
    digest = hashlib.sha256(json.dumps([_vae_reference(vae), size, flip, shard_size]).encode())
    for file, label in zip(files, labels):
        digest.update(f"{file.relative_to(source)}\t{label}\n".encode())
    return digest.hexdigest()


def _check_out(out: Path, fingerprint: str) -> bool:
    """True when ``out`` holds an interrupted run of the same command (to finish), False when it is new or
    empty; anything else is an error."""
    if (out / METADATA_FILE).exists():
        old = read_metadata(out, require_complete=False)
        if old["complete"]:
            raise ValueError(f"{str(out)!r} already holds a complete latent cache; choose another --out or delete it")
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{str(out)!r} holds an unfinished latent cache made from other images or settings; re-run the original "
                f"command to finish it, or choose another --out"
            )
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {str(out)!r} exists and is not an empty folder or a latent cache; choose a new or empty folder")
    return False


def _shard_done(out: Path, shard: dict[str, Any]) -> bool:
    latents, labels = out / shard["latents"], out / shard["labels"]
    return latents.exists() and labels.exists() and np.load(latents, mmap_mode="r").shape[0] == shard["count"]


def _encode_shards(model, files, labels, pending: list[int], meta, out: Path, batch_size: int, shard_size: int,
                   device: torch.device, num_workers: int, progress: bool) -> None:
    """Encode the shards listed in ``pending`` in order; a shard is written as soon as it is full."""
    spans = {k: (k * shard_size, k * shard_size + meta["shards"][k]["count"]) for k in pending}  # [start, end) per shard
    batches = [list(range(i, min(i + batch_size, end))) for start, end in spans.values() for i in range(start, end, batch_size)]
    loader = torch.utils.data.DataLoader(_ImageFiles(files, meta["image_size"]), batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    parts: list[np.ndarray] = []
    with tqdm(total=sum(len(b) for b in batches), unit="img", desc="encoding", disable=not progress) as bar:
        for images, positions in loader:
            parts.append(_encode_moments(model, images, meta["views"] == 2, device))
            bar.update(len(positions))
            shard = int(positions[0]) // shard_size
            start, end = spans[shard]
            if int(positions[-1]) + 1 == end:
                _save_npy(out / meta["shards"][shard]["labels"], np.asarray(labels[start:end], dtype=np.int64))
                _save_npy(out / meta["shards"][shard]["latents"], np.concatenate(parts))
                parts = []


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def read_metadata(path: str | Path, require_complete: bool = True) -> dict[str, Any]:
    """The ``latents.json`` of the cache folder ``path``, checked for format and completeness."""
    meta_file = Path(path) / METADATA_FILE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"latent cache folder {str(path)!r} does not exist; create it with: meanflow encode IMAGE_FOLDER --out {path}")
    if not meta_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no {METADATA_FILE}, so it is not a latent cache; create one with: meanflow encode IMAGE_FOLDER --out {path}")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"latent cache metadata {str(meta_file)!r} is corrupt ({err}); re-encode the images with meanflow encode") from err
    missing = [k for k in ("format", "version", "complete", "vae", "latent_scale", "image_size", "views", "count", "num_classes", "shards")
               if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise ValueError(f"latent cache metadata {str(meta_file)!r} is corrupt or not a {FORMAT} file (missing {', '.join(missing) or 'format'}); re-encode the images")
    if meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{str(meta_file)!r} has cache format version {meta['version']}; this meanflow reads up to {FORMAT_VERSION}, upgrade meanflow")
    if require_complete and not meta["complete"]:
        raise ValueError(f"latent cache {str(path)!r} is incomplete (encoding was interrupted); re-run the same meanflow encode command to finish it")
    return meta


# --------------------------------------------------------------------------- training data


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


# --------------------------------------------------------------------------- decoding


def normalise(z: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """VAE latents (B, C, h, w) -> network inputs, in place: per-channel ``(z - mean_c) / std_c`` when
    ``info`` records ``latent_mean`` / ``latent_std`` (iMF), else ``(z - shift) * scale``."""
    if "latent_mean" in info:
        mean, std = (torch.tensor(info[k], dtype=z.dtype, device=z.device)[:, None, None] for k in ("latent_mean", "latent_std"))
        return z.sub_(mean).div_(std)
    return z.sub_(float(info.get("latent_shift", 0.0))).mul_(float(info["latent_scale"]))


def denormalise(x: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """Network outputs (B, C, h, w) -> VAE latents: the inverse of :func:`normalise` (a new tensor)."""
    if "latent_mean" in info:
        mean, std = (torch.tensor(info[k], dtype=x.dtype, device=x.device)[:, None, None] for k in ("latent_mean", "latent_std"))
        return x * std + mean
    return x / float(info["latent_scale"]) + float(info.get("latent_shift", 0.0))




@torch.no_grad()
def decode(latents: torch.Tensor, info: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 32,
           vae: str | None = None) -> torch.Tensor:
    """Normalised latents (N, C, h, w) -> images (N, 3, H, W) float32 in [-1, 1] on the CPU.

    Undoes the normalisation recorded in ``info`` (:func:`denormalise`) and runs the decoder
    of ``info["vae"]`` (or ``vae``, e.g. a local copy when the recorded path moved).
    """
    missing = [k for k, present in (("vae", vae or "vae" in info), ("latent_scale", "latent_scale" in info or "latent_mean" in info)) if not present]
    if missing:
        raise ValueError(f"the data info has no {', '.join(missing)}: these samples do not come from a latent data set")
    model = load_vae(vae or info["vae"], device)
    images = []
    for chunk in latents.split(batch_size):
        z = denormalise(chunk.to(device=device, dtype=torch.float32), info)  # (b, C, h, w)
        images.append(model.decode(z).sample.clamp(-1.0, 1.0).float().cpu())  # (b, 3, H, W)
    return torch.cat(images)


__all__ = [
    "DEFAULT_VAE", "IMF_LATENT_MEAN", "IMF_LATENT_STD", "METADATA_FILE", "NORMALISATIONS", "LatentDataset", "adm_center_crop",
    "decode", "denormalise", "encode_folder", "load_latent_dataset", "load_vae", "normalise", "read_metadata",
]
