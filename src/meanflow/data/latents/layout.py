"""The latent cache on disk: ``latents.json`` (format, VAE, normalisation, shard list) beside
fp16 ``.npy`` shards of posterior moments; :func:`read_metadata` checks it.

What is stored: the *moments* of the VAE posterior N(mean, std^2), not a single draw. Each image
becomes an fp16 array (views, 2, C, h, w): ``[:, 0]`` the posterior mean, ``[:, 1]`` its std; view 0
is the image, view 1 (with ``--flip``) its mirror image encoded separately (flipping a latent is not
the latent of the flipped image). Training draws a fresh posterior sample ``mean + std * e`` and a
random view each time an image is used, which matches DiT / MeanFlow training with on-the-fly
encoding at twice the storage of a single stored draw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METADATA_FILE = "latents.json"


FORMAT = "meanflow-latents"


FORMAT_VERSION = 1


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
