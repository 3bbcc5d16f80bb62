"""SD-VAE latent caches, one module per job: ``encode`` an image folder once (layout: ``layout``),
train on the latents (``dataset``, normalised by ``normalisation``), decode samples (``vae``); docs/LATENTS.md."""
from .dataset import POSTERIORS, LatentDataset, load_latent_dataset
from .encode import DEFAULT_SHARD_SIZE, adm_center_crop, encode_folder
from .layout import FORMAT, FORMAT_VERSION, METADATA_FILE, read_metadata
from .normalisation import IMF_LATENT_MEAN, IMF_LATENT_STD, NORMALISATIONS, denormalise, normalise
from .vae import DEFAULT_VAE, decode, load_vae

__all__ = [
    "DEFAULT_SHARD_SIZE", "DEFAULT_VAE", "FORMAT", "FORMAT_VERSION", "IMF_LATENT_MEAN", "IMF_LATENT_STD", "METADATA_FILE",
    "NORMALISATIONS", "POSTERIORS", "LatentDataset", "adm_center_crop", "decode", "denormalise", "encode_folder",
    "load_latent_dataset", "load_vae", "normalise", "read_metadata",
]
