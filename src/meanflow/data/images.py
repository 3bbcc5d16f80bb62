"""Image data sets and image utilities.

Images are stored as uint8 tensors (N, C, H, W) with values 0..255 inside a
:class:`~meanflow.data.base.TensorDataset` of kind ``"images"``; ``get`` maps them to floats in
[-1, 1] by ``u / 127.5 - 1``. The inverse used for saving samples is :func:`to_uint8`,
``clamp(round((x + 1) * 127.5), 0, 255)``, so a stored image survives the round trip exactly.

Sources: scikit-learn's digits (shipped with scikit-learn, no download), a folder of images with
one sub-folder per class, a .npz array, and CIFAR-10 / MNIST through torchvision.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import TensorDataset
from .arrays import check_labels, read_array_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_DEFAULT_SIZE = 16
_NPZ_IMAGE_KEYS = ("x", "images", "arr_0")
GRAY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes read as one channel
# torchvision class and the folder it expects under the root directory
_TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "mnist": ("MNIST", "MNIST/raw")}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) with values in [-1, 1] -> (N, H, W, C) uint8 by clamp(round((x + 1) * 127.5), 0, 255)."""
    pixels = ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_size: int = 32) -> None:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid with ``nrow`` images per row (default ~sqrt(N)).

    Images smaller than ``min_size`` pixels are enlarged by an integer factor (nearest neighbour,
    pixels stay visible) so that small samples such as 8x8 digits can be looked at.
    """
    from PIL import Image

    pixels = grid_pixels(images, nrow, min_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def grid_pixels(images: torch.Tensor, nrow: int | None = None, min_size: int = 32) -> np.ndarray:
    """The grid of :func:`save_grid` as a uint8 array (H', W', C), C = 1 or 3."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    factor = max(1, math.ceil(min_size / images.shape[-1]))
    images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)  # (3 or C, H', W')
    return to_uint8(grid[None])[0].numpy()  # (H', W', C)


def random_flip(x: torch.Tensor, flip_mask: torch.Tensor) -> torch.Tensor:
    """Mirror images x (B, C, H, W) left-right where ``flip_mask`` (B,) bool is True."""
    return torch.where(flip_mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize uint8 images (N, C, H, W) to (N, C, size, size), antialiased when shrinking."""
    _check_size(size)
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _check_size(size: int | None) -> None:
    if size is not None and size < 1:
        raise ValueError(f"data.image_size must be a positive number of pixels, got {size}")


def load_digits(image_size: int | None = None) -> TensorDataset:
    """scikit-learn's 1797 hand-written digits: (1797, 1, S, S) uint8, labels 0..9.

    The 8 x 8 originals (values 0..16) are mapped to 0..255 by round(v * 255 / 16) and resized
    bilinearly to ``image_size`` (default 16, so that patch sizes 2 and 4 and two 2x down-samplings fit).
    """
    datasets = _optional_import("sklearn.datasets", "scikit-learn")
    bunch = datasets.load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    images = resize_uint8(torch.from_numpy(pixels)[:, None], image_size or DIGITS_DEFAULT_SIZE)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return TensorDataset(images, labels, num_classes=10, kind="images", info={"source": "digits"})


def load_image_folder(path: str | Path, image_size: int | None = None, channels: int | None = None) -> TensorDataset:
    """Images under ``path``: one sub-folder per class (labels follow sorted folder names) or a flat folder.

    Each image is resized so that its shorter side is ``image_size`` and centre cropped to a square;
    without ``image_size`` all images must already share one size. ``channels`` is 1 (grayscale) or
    3 (RGB); by default 1 when every image is grayscale, else 3. Returns uint8 (N, C, S, S).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    _check_size(image_size)
    files, labels, classes = _list_image_files(root)
    if channels is None:  # from the file headers: no image is decoded twice or kept at full size
        channels = 1 if all(_open_image(file, decode=False).mode in GRAY_MODES for file in files) else 3
    arrays = [read_image(file, channels, image_size) for file in files]  # one decoded image alive at a time
    _check_same_size(arrays, files)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, S, S)
    label_tensor = torch.tensor(labels, dtype=torch.int64) if classes else None
    return TensorDataset(images, label_tensor, num_classes=len(classes), kind="images", info={"source": "folder", "classes": classes})


def _list_image_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under root, their labels and the class names (empty for a flat folder)."""
    entries = sorted(root.iterdir())
    if not entries:
        raise ValueError(f"image folder {str(root)!r} is empty")
    top_images = [p for p in entries if _is_image(p)]
    class_dirs = [p for p in entries if p.is_dir() and any(_is_image(f) for f in p.iterdir())]
    if top_images and class_dirs:
        raise ValueError(f"image folder {str(root)!r} mixes images at the top level with class sub-folders; use one layout")
    if top_images:
        return top_images, [0] * len(top_images), []
    if not class_dirs:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {str(root)!r} or its sub-folders")
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        images = sorted(f for f in folder.iterdir() if _is_image(f))
        files += images
        labels += [label] * len(images)
    return files, labels, [d.name for d in class_dirs]


def folder_batches(root: str | Path, channels: int, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """uint8 batches (B, H, W, C) of every image file under ``root`` (any depth, sorted paths), read one
    batch at a time (for folders too large for memory); the images must share one size."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if _is_image(p))[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(root)!r}")
    first = None
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays = [read_image(file, channels) for file in chunk]
        first = first or (arrays[0], chunk[0])
        _check_same_size([first[0], *arrays], [first[1], *chunk], fix="resize or crop them to one size first")
        yield np.stack(arrays)


def read_image(file: Path, channels: int, size: int | None = None) -> np.ndarray:
    """(S, S, C) uint8 of one image file: converted to 1 (L) or 3 (RGB) channels; with ``size``, the
    shorter side resized (bicubic) to ``size`` and centre cropped. The one image-file reader."""
    return _image_array(_open_image(file), channels, size)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _open_image(file: Path, decode: bool = True):
    """The PIL image of a file, decoded (its pixels in memory, the file closed) or, with ``decode=False``,
    only its header (mode and size; the file closed, pixels not read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            if decode:
                image.load()
            return image
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image file {str(file)!r}: {err}") from err


def _image_array(image, channels: int, size: int | None) -> np.ndarray:
    """PIL image -> (S, S, C) uint8 after conversion, shorter-side resize and centre crop."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _check_same_size(arrays: list[np.ndarray], files: list[Path], fix: str | None = None) -> None:
    """All arrays (H, W, C) must share one size; for training data (``fix`` None) a square one (true
    after resizing; checked when not resizing). ``fix``: the advice when sizes differ elsewhere."""
    first = arrays[0].shape[:2]
    for array, file in zip(arrays, files):
        if array.shape[:2] != first:
            raise ValueError(
                f"images have different sizes ({str(files[0])!r} is {first[1]}x{first[0]}, {str(file)!r} is "
                f"{array.shape[1]}x{array.shape[0]}); {fix or 'set data.image_size to resize and centre crop them'}"
            )
    if fix is None and first[0] != first[1]:
        raise ValueError(f"images are not square ({str(files[0])!r} is {first[1]}x{first[0]}); set data.image_size to centre crop them")


def load_npz_images(path: str | Path, image_size: int | None = None) -> TensorDataset:
    """uint8 images from a .npz file: key ``x``, ``images`` or ``arr_0`` (else the first array; a .npy
    file is the array itself), NHWC, NCHW or NHW (grayscale); optional integer labels under ``labels``
    or ``y``. Resized bilinearly when ``image_size`` is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    array, raw_labels = read_array_file(path, _NPZ_IMAGE_KEYS)
    images = _to_nchw(array, repr(str(path)))
    if image_size is not None:
        images = resize_uint8(images, image_size)
    labels = None if raw_labels is None else check_labels(raw_labels, images.shape[0], repr(str(path)))
    num_classes = 0 if labels is None else int(labels.max()) + 1
    return TensorDataset(images, labels, num_classes=num_classes, kind="images", info={"source": "npz"})


def _to_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, C, H, W) uint8 tensor."""
    if array.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 (0..255), got {array.dtype}; convert with (x * 255).round().astype(np.uint8)")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim != 4:
        raise ValueError(f"{source}: images must have shape (N, H, W, C), (N, C, H, W) or (N, H, W), got {array.shape}")
    elif array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3):
        raise ValueError(f"{source}: cannot find a channel axis of size 1 or 3 in shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{source}: the image array is empty")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_torchvision(name: str, root: str | Path, train: bool, download: bool, image_size: int | None = None) -> TensorDataset:
    """CIFAR-10 (3 x 32 x 32) or MNIST (1 x 28 x 28) through torchvision, as uint8 images with labels 0..9.

    Files are looked up in ``root`` (torchvision's layout); with ``download`` they are fetched when
    missing. Missing files without download, or a failed download, raise RuntimeError.
    """
    if name not in _TORCHVISION:
        raise ValueError(f"unknown torchvision data set {name!r}; choose one of {', '.join(_TORCHVISION)}")
    datasets = _optional_import("torchvision.datasets", "torchvision")
    split = "train" if train else "test"
    class_name, folder = _TORCHVISION[name]
    try:
        data = getattr(datasets, class_name)(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:
        action = "downloading failed (no network?)" if download else "the files are missing and download is off"
        raise RuntimeError(
            f"cannot load {name} ({split} split) from {str(root)!r}: {action} ({err}). Pass data.download=true "
            f"with network access, or put torchvision's {name} files in {str(Path(root) / folder)!r} (data.path sets the root)"
        ) from err
    pixels = torch.as_tensor(np.asarray(data.data))  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28)
    images = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    if image_size is not None:
        images = resize_uint8(images, image_size)
    labels = torch.as_tensor(np.asarray(data.targets), dtype=torch.int64)
    return TensorDataset(images.contiguous(), labels, num_classes=10, kind="images", info={"source": name})


def _optional_import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"this data source needs {package}; install it with pip install 'meanflow[images]'") from err
