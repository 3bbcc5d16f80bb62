"""Inception v3 features as FID is computed in the field.

The network is the TensorFlow FID Inception v3 ported to PyTorch (weights
``pt_inception-2015-12-05-6726825d.pth``, the same file pytorch-fid, torch-fidelity and, through the
TF graph, the ADM evaluator use), taken from torch-fidelity's ``FeatureExtractorInceptionV3``.
Images are resized to 299x299 with TF1-style bilinear interpolation (as in the TF graph), scaled
to [-1, 1] as (x - 128) / 128 and mapped, in full float32 (no TF32 on GPUs), to

    "pool":   (N, 2048) average-pool features (FID, precision / recall)
    "logits": (N, 1008) pool @ W^T without the bias, as in the original Inception Score code
              and the ADM evaluator (torch-fidelity's ``logits_unbiased``)

Weights are looked up, in order: the ``weights_path`` argument, the environment variable
``MEANFLOW_INCEPTION_WEIGHTS``, the torch hub cache (``$TORCH_HOME/hub/checkpoints``) under either
file name, and finally torch-fidelity's download URL into that cache when ``download`` is true.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .image_metrics import ImageBatch, images_to_nchw

WEIGHTS_ENV = "MEANFLOW_INCEPTION_WEIGHTS"
# The same weights under the names torch-fidelity and pytorch-fid give them.
WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
_FEATURES = ("2048", "logits_unbiased")


def _missing_weights_error(reason: str) -> RuntimeError:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return RuntimeError(
        f"FID Inception weights not available ({reason}). Download {WEIGHTS_FILES[1]} "
        f"(from {WEIGHTS_URLS[1]} or {WEIGHTS_URLS[0]}) on a machine with internet access, then either "
        f"pass its path (weights_path=... / --weights PATH), set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILES[1]}, "
        f"or copy it to {cache}/"
    )


def resolve_inception_weights(weights_path: str | Path | None = None, download: bool = True) -> Path:
    """Path of the FID Inception weights file (see the module docstring for the search order)."""
    for given, origin in ((weights_path, "weights_path"), (os.environ.get(WEIGHTS_ENV), WEIGHTS_ENV)):
        if given:
            if not Path(given).is_file():
                raise FileNotFoundError(f"Inception weights file {given} (from {origin}) does not exist")
            return Path(given)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHTS_FILES:
        if (cache / name).is_file():
            return cache / name
    if not download:
        raise _missing_weights_error(f"none given and none in {cache}, download disabled")
    target = cache / WEIGHTS_FILES[0]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URLS[0], str(target), progress=False)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise _missing_weights_error(f"download failed: {err}") from err
    return target


def _check_state_dict(path: Path) -> None:
    """Read ``path`` with ``weights_only=True`` (no arbitrary pickled code); it must be a state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for unreadable / unsafe files
        raise RuntimeError(f"cannot read {path} as a PyTorch state dict: {err}") from err
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} holds a {type(state).__name__}, expected a state dict of the FID Inception")


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA inside (PyTorch lets cuDNN use TF32 by default,
    which perturbs features by ~1e-3 relative); the caller's settings are restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures:
    """FID Inception v3 feature extractor: uint8 images of any size -> {"pool", "logits"}.

    Args:
        weights_path: the ``pt_inception-2015-12-05`` state dict (see module docstring for fallbacks).
        device: where the network runs (default: CUDA when available, else CPU).
        download: allow torch-fidelity's download into the torch hub cache when no file is found.
        batch_size: inputs larger than this are processed in chunks.
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: str | torch.device | None = None,
        download: bool = True,
        batch_size: int = 64,
    ) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = resolve_inception_weights(weights_path, download)
        _check_state_dict(self.weights_path)  # safe read first: the library itself unpickles freely
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=str(self.weights_path)
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.weights_path} does not hold the FID Inception weights ({WEIGHTS_FILES[1]}): {err}"
            ) from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: ImageBatch) -> dict[str, torch.Tensor]:
        """uint8 images (N, H, W, C) / (N, C, H, W) / (N, H, W), C in {1, 3}, any H, W ->
        {"pool": (N, 2048), "logits": (N, 1008)} float32 on the CPU. Grayscale is repeated to RGB."""
        x = images_to_nchw(images)  # (N, C, H, W)
        if x.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures expects uint8 images, got {x.dtype}; see meanflow.data.to_uint8")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (N, 3, H, W)
        pools, logits = [], []
        with _no_tf32():
            for chunk in x.split(self.batch_size):
                pool, logit = self.net(chunk.to(self.device).contiguous())  # (B, 2048), (B, 1008)
                pools.append(pool.float().cpu())
                logits.append(logit.float().cpu())
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}
