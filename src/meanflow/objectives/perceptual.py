"""Perceptual distances of pixel MeanFlow's auxiliary losses (official ``utils/auxloss_util.py``).

Both compare a predicted image with its data image, per sample, after the same random resized
crop of both to 224 x 224 (area fraction U(0.08, 1), aspect ratio log-uniform on [3/4, 4/3],
corner uniform; bicubic antialiased resampling), images in [-1, 1] as the data are:

* **LPIPS (VGG)**: the ``lpips`` package's ``LPIPS(net="vgg")`` (Zhang et al., 2018; its linear
  weights v0.1 ship with the package, the VGG-16 trunk is torchvision's ImageNet weights), which
  the official JAX port ``lpips_j`` was converted from.
* **ConvNeXt**: ||f(a) - f(b)||^2 of the pooled, layer-normalised features (1024 values, the
  classifier head is not used) of ConvNeXt V2 Base fine-tuned on ImageNet-22k at 224 px, Hugging
  Face ``facebook/convnextv2-base-22k-224`` in ``transformers``' definition, which is the checkpoint
  the official code converts (with its final LayerNorm epsilon, 1e-6).

Pretrained weights are fetched the usual way on first use and cached: VGG-16 by torchvision into
``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch``), ConvNeXt by ``huggingface_hub``
into ``$HF_HOME/hub/`` (default ``~/.cache/huggingface``). Without network access and without the
cached file, building a backbone raises :class:`PerceptualWeightsMissing` naming the file and the
command that fetches it. ``pretrained=False`` builds the same networks with random weights (tests,
smoke runs).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .draws import BatchRandom

CROP_SIZE = 224  # official: the crops are resampled to 224 x 224
CROP_AREA = (0.08, 1.0)  # official: fraction of the image area
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # official: aspect ratio w / h, log-uniform
CONVNEXT_REPO = "facebook/convnextv2-base-22k-224"  # the official code's ConvNeXt checkpoint
CONVNEXT_LAYER_NORM_EPS = 1e-6  # the official network's final LayerNorm epsilon
MISSING_PACKAGE = "the pMF perceptual losses need the {!r} package: pip install 'meanflow[perceptual]'"


class PerceptualWeightsMissing(RuntimeError):
    """Pretrained perceptual weights are neither cached nor downloadable."""


def crop_boxes(rand: BatchRandom, height: int, width: int) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, h, w) of the official paired random resized crop, drawn from ``rand``.

    Per sample: area fraction s ~ U(0.08, 1), aspect a = exp(U(log 3/4, log 4/3)),
    w = clip(round(sqrt(s H W a)), 1, W), h = clip(round(sqrt(s H W / a)), 1, H), then top and
    left uniform over the positions that keep the box inside the image.
    """
    area = height * width * (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * rand.uniform())
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(low + (high - low) * rand.uniform())
    w = torch.round(torch.sqrt(area * aspect)).clamp(1, width).long()
    h = torch.round(torch.sqrt(area / aspect)).clamp(1, height).long()
    top = torch.floor(rand.uniform() * (height - h + 1)).long()
    left = torch.floor(rand.uniform() * (width - w + 1)).long()
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Each image's box resampled to size x size (bicubic, antialiased): images (B, C, H, W), boxes (B, 4) -> (B, C, size, size)."""
    out = []
    for image, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = image[None, :, top:top + h, left:left + w]
        out.append(F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    return torch.cat(out)


class PerceptualDistances(nn.Module):
    """Per-sample LPIPS and ConvNeXt distances between predicted and data images (module docstring).

    ``lpips`` / ``convnext``: the backbone modules, or None for a term that is not used. Build the
    official ones with :meth:`official`; tests pass small randomly initialised ones. The backbones
    are frozen: gradients reach only the images.
    """

    def __init__(self, lpips: nn.Module | None, convnext: nn.Module | None, size: int = CROP_SIZE):
        super().__init__()
        self.lpips, self.convnext, self.size = lpips, convnext, size
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def official(cls, lpips: bool, convnext: bool, pretrained: bool = True) -> "PerceptualDistances":
        """The official backbones for the terms asked for, pretrained (downloaded once, cached) or random."""
        return cls(lpips_vgg(pretrained) if lpips else None, convnext_v2_base(pretrained) if convnext else None)

    def forward(self, pred: torch.Tensor, data: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LPIPS, ConvNeXt) distances, each (B,) (zeros for an unused term); pred, data: (B, 3, H, W) in [-1, 1]."""
        a, b = resized_crops(pred, boxes, self.size), resized_crops(data, boxes, self.size)
        zeros = pred.new_zeros(pred.shape[0])
        lpips = self.lpips(a, b).reshape(-1) if self.lpips is not None else zeros
        if self.convnext is None:
            return lpips, zeros
        features = self.convnext(torch.cat([a, b])).pooler_output  # (2B, F)
        fa, fb = features.chunk(2)
        return lpips, (fa - fb).pow(2).sum(1)


def lpips_vgg(pretrained: bool = True) -> nn.Module:
    """``lpips.LPIPS(net="vgg")`` (v0.1 linear weights from the package); VGG-16 trunk pretrained or random."""
    try:
        import lpips
    except ImportError:
        raise ImportError(MISSING_PACKAGE.format("lpips")) from None
    if pretrained:
        _vgg16_weights()
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained`` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)


def convnext_v2_base(pretrained: bool = True) -> nn.Module:
    """``transformers.ConvNextV2Model`` of :data:`CONVNEXT_REPO`, pretrained or with random weights of the same shape."""
    try:
        import transformers
    except ImportError:
        raise ImportError(MISSING_PACKAGE.format("transformers")) from None
    if not pretrained:
        config = transformers.ConvNextV2Config(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024],
                                               layer_norm_eps=CONVNEXT_LAYER_NORM_EPS)
        return transformers.ConvNextV2Model(config)
    try:
        return transformers.ConvNextV2Model.from_pretrained(CONVNEXT_REPO, layer_norm_eps=CONVNEXT_LAYER_NORM_EPS)
    except OSError as err:
        raise PerceptualWeightsMissing(
            f"the ConvNeXt perceptual loss needs the weights of {CONVNEXT_REPO} (config.json and the weights file), "
            f"which are not in the Hugging Face cache and could not be downloaded ({_first_line(err)}). On a machine with network "
            f"access run `huggingface-cli download {CONVNEXT_REPO}` (or set HF_HOME to a cache that holds it), or "
            "train without it (objective.convnext_weight=0)"
        ) from None


def _vgg16_weights() -> Path:
    """The cached torchvision VGG-16 ImageNet weights, downloaded if missing; PerceptualWeightsMissing when that fails."""
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.exists():
        try:
            torch.hub.load_state_dict_from_url(url, progress=False)
        except OSError as err:  # urllib's URLError is an OSError
            raise PerceptualWeightsMissing(
                f"the LPIPS perceptual loss needs torchvision's VGG-16 weights {path.name}, which are not in {path.parent} "
                f"and could not be downloaded ({_first_line(err)}). On a machine with network access run `python -c \"import torchvision; "
                f"torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` (or copy {url} there; TORCH_HOME moves the cache), or "
                "train without it (objective.lpips_weight=0)"
            ) from None
    return path


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
