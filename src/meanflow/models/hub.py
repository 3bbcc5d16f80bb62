"""Released weights by Hugging Face hub id: a file of a hub repository fetched into huggingface_hub's cache.

    meanflow.models.from_pretrained("Lyy0725/pMF", filename="pMF-B-16.zip")   # pMF, Orbax directory zipped
    meanflow.models.from_pretrained("Lyy0725/iMF", filename="iMF-B-2.pth")    # iMF, the PyTorch port's weights

The file is downloaded once into the huggingface_hub cache (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``)
and read from there as a local file by :func:`meanflow.models.pretrained.load_pretrained`. With
``HF_HUB_OFFLINE=1`` (or without network) a cached file is used and a missing one is an error that
names the repository and the file and says how to fetch it. Needs ``pip install 'meanflow[hub]'``.
"""
from __future__ import annotations

from pathlib import Path

# The official releases on the hub: repository -> files (READMEs of Lyy-iiis/pMF main and torch, Lyy-iiis/imeanflow torch).
RELEASES = {
    "Lyy0725/pMF": tuple(f"pMF-{size}-{patch}{kind}" for size in "BLH" for patch in (16, 32) for kind in (".zip", "-full.zip", ".pt")),
    "Lyy0725/iMF": tuple(f"iMF-{size}-2.pth" for size in ("B", "M", "L", "XL")),
}


class HubError(ValueError):
    """A hub file could not be had; the message names the repository, the file and what to do."""


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """The local path of ``filename`` of hub repository ``repo_id`` (fetched into the cache if missing)."""
    try:
        from huggingface_hub import constants, hf_hub_download  # noqa: PLC0415 (optional dependency)
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415
    except ImportError:
        raise HubError(f"reading {filename} of the hub repository {repo_id} needs huggingface_hub: "
                              "pip install 'meanflow[hub]' (or download the file yourself and pass its path)") from None
    where = f"{filename} of {repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        state = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached"
        raise HubError(
            f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {state}. Fetch it once where there is "
            f"network: huggingface-cli download {repo_id} {filename}" + (f" --revision {revision}" if revision else "")
            + " (or download it and pass its local path)") from None
    except EntryNotFoundError:
        known = RELEASES.get(repo_id)
        raise HubError(f"the hub repository {repo_id} has no file {filename}"
                              + (f"; its released files: {', '.join(known)}" if known else "")) from None
    except RepositoryNotFoundError:
        raise HubError(f"no hub repository {repo_id} (or it is private); the official releases: {', '.join(RELEASES)}") from None
