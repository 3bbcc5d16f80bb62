"""Latent pipeline: ADM crop, `meanflow encode`, LatentDataset, decode, training end to end, ImageNet configs.

A tiny randomly initialised AutoencoderKL (2 down blocks: factor 2) saved with save_pretrained
stands in for the SD VAE, so the --vae PATH code path is the one under test and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from meanflow.cli import encode as encode_cli  # noqa: E402
from meanflow.config import load_config  # noqa: E402
from meanflow.data import load_dataset  # noqa: E402
from meanflow.data.latents import (  # noqa: E402
    METADATA_FILE, LatentDataset, adm_center_crop, decode, encode_folder, load_latent_dataset, read_metadata,
)

SIZE = 16  # image side; latents are 4 x 8 x 8
SCALE = 0.5  # the tiny VAE's scaling_factor: must be read from its config, not assumed to be 0.18215
IMAGE_SIZES = {"cat": [(40, 30), (16, 16), (25, 50)], "dog": [(64, 33), (20, 20)]}  # (width, height)


def _tiny_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=SCALE,
    )
    with torch.no_grad():  # a sharp posterior (std ~ 0.02), so that the two views are told apart by their means
        vae.quant_conv.bias[4:] -= 8.0
    return vae.eval()


def _write_images(root: Path) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(0)
    files = []
    for label, (name, sizes) in enumerate(sorted(IMAGE_SIZES.items())):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            file = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(file)
            files.append((file, label))
    return files


def _encode_cli(source: Path, out: Path, vae: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    encode_cli.register(parser.add_subparsers())
    args = parser.parse_args(["encode", str(source), "--out", str(out), "--vae", str(vae), "--image-size", str(SIZE),
                              "--batch-size", "2", "--device", "cpu", "--no-progress", *extra])
    return args.func(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, files with labels, VAE, cache dir): 5 images of 2 classes encoded with --flip, 3 per shard."""
    root = tmp_path_factory.mktemp("latents")
    vae = _tiny_vae()
    vae.save_pretrained(root / "vae")
    files = _write_images(root / "images")
    assert _encode_cli(root / "images", root / "cache", root / "vae", "--flip", "--shard-size", "3", "--num-workers", "1") == 0
    return root, files, vae, root / "cache"


def _reference_moments(vae, file: Path, mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std), each (4, 8, 8), of one image computed directly with diffusers."""
    x = torch.from_numpy(adm_center_crop(Image.open(file), SIZE).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x.flip(-1) if mirror else x).latent_dist
    return dist.mean[0], dist.std[0]


def test_adm_center_crop_box_halving_matches_block_means():
    """A 2S x 4S image: one BOX halving gives S x 2S (then BICUBIC to the same size is a no-op), and
    the crop keeps the middle S columns: the result is the 2x2 block mean of the middle 2S columns."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2 * SIZE, 4 * SIZE, 3), dtype=np.uint8)
    out = adm_center_crop(Image.fromarray(pixels), SIZE)
    blocks = pixels.astype(np.float64).reshape(SIZE, 2, 2 * SIZE, 2, 3).mean(axis=(1, 3))  # (S, 2S, 3)
    expected = blocks[:, SIZE // 2:SIZE // 2 + SIZE]
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert np.abs(out - expected).max() <= 1.0


@pytest.mark.parametrize("width, height", [(100, 60), (60, 100), (10, 6), (17, 16), (16, 16)])
def test_adm_center_crop_gives_a_square_of_the_requested_size(width, height):
    image = Image.new("L", (width, height), color=200)  # grayscale input is converted to RGB
    out = adm_center_crop(image, 8)
    assert out.shape == (8, 8, 3) and (out == 200).all()


def test_encode_writes_shards_and_metadata(setup):
    root, files, vae, cache = setup
    meta = json.loads((cache / METADATA_FILE).read_text())
    assert meta["complete"] and meta["count"] == 5 and meta["classes"] == ["cat", "dog"] and meta["num_classes"] == 2
    assert meta["latent_scale"] == SCALE and meta["image_size"] == SIZE and meta["views"] == 2
    assert meta["latent_shape"] == [4, SIZE // 2, SIZE // 2] and meta["vae"] == str((root / "vae").resolve())
    assert [s["count"] for s in meta["shards"]] == [3, 2]
    for shard in meta["shards"]:
        moments = np.load(cache / shard["latents"])
        assert moments.dtype == np.float16 and moments.shape == (shard["count"], 2, 2, 4, SIZE // 2, SIZE // 2)
        assert np.load(cache / shard["labels"]).dtype == np.int64
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".tmp-*"))


def test_stored_moments_match_a_direct_encoding_of_image_and_mirror(setup):
    root, files, vae, cache = setup
    moments = np.concatenate([np.load(cache / s["latents"]) for s in read_metadata(cache)["shards"]]).astype(np.float32)
    for i, (file, _) in enumerate(files):
        for view in (0, 1):
            mean, std = _reference_moments(vae, file, mirror=view == 1)
            torch.testing.assert_close(torch.from_numpy(moments[i, view, 0]), mean, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(torch.from_numpy(moments[i, view, 1]), std, atol=1e-4, rtol=2e-3)


def test_dataset_shapes_labels_and_posterior_mean(setup):
    root, files, vae, cache = setup
    data = LatentDataset(cache, posterior="mean")
    assert (data.kind, len(data), data.sample_shape, data.num_classes) == ("latents", 5, (4, SIZE // 2, SIZE // 2), 2)
    assert data.info["latent_scale"] == SCALE and data.info["vae"] == str((root / "vae").resolve()) and data.info["image_size"] == SIZE
    index = torch.tensor([4, 0, 3, 3])
    x, labels = data.get(index)
    assert x.dtype == torch.float32 and x.shape == (4, 4, SIZE // 2, SIZE // 2)
    assert labels.dtype == torch.int64 and labels.tolist() == [files[i][1] for i in index]
    for row, i in enumerate(index.tolist()):
        torch.testing.assert_close(x[row], SCALE * _reference_moments(vae, files[i][0], mirror=False)[0], atol=2e-3, rtol=2e-3)


def test_dataset_samples_the_posterior_of_a_random_view(setup):
    """get() draws mean + std * e of view 0 or 1 with probability 1/2 each; e ~ N(0, I); reproducible."""
    root, files, vae, cache = setup
    data = LatentDataset(cache, seed=3)
    stored = torch.from_numpy(np.load(cache / read_metadata(cache)["shards"][0]["latents"])[1].astype(np.float32))  # (2, 2, 4, 8, 8)
    index = torch.ones(4000, dtype=torch.int64)
    x, _ = data.get(index)
    z = x / SCALE  # (N, 4, 8, 8)
    residual = (z[:, None] - stored[None, :, 0]) / stored[None, :, 1]  # (N, 2 views, 4, 8, 8)
    chi2 = residual.pow(2).flatten(2).sum(-1)  # (N, 2)
    view = chi2.argmin(1)
    assert 0.45 < view.float().mean() < 0.55
    e = residual[torch.arange(len(view)), view]  # (N, 4, 8, 8), should be standard normal
    assert abs(float(e.mean())) < 0.01 and abs(float(e.std()) - 1.0) < 0.01
    assert torch.equal(data.get(index)[0], x)  # same request, same draw
    assert not torch.equal(data.get(torch.tensor([1, 2]))[0][0], data.get(torch.tensor([1, 3]))[0][0])


def test_decode_matches_the_vae_decoder(setup):
    root, files, vae, cache = setup
    data = LatentDataset(cache, posterior="mean")
    x, _ = data.get(torch.arange(3))
    images = decode(x, data.info, batch_size=2)
    with torch.no_grad():
        expected = vae.decode(x / SCALE).sample.clamp(-1, 1)
    assert images.shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_load_dataset_and_config_checks(setup):
    root, files, vae, cache = setup
    cfg = load_config(None, ["data.name=latents", f"data.path={cache}"])
    train, reference = load_dataset(cfg.data, seed=0)
    assert isinstance(train, LatentDataset) and reference is None and len(train) == 5
    with pytest.raises(ValueError, match="mirror"):
        load_latent_dataset(cache, flip=True)
    with pytest.raises(ValueError, match="encoded at 16"):
        load_latent_dataset(cache, image_size=32)
    assert train.without_labels().get(torch.arange(2))[1] is None and train.without_labels().num_classes == 0


def test_encode_resumes_an_interrupted_cache(setup, tmp_path):
    root, files, vae, cache = setup
    out = tmp_path / "cache"
    encode_folder(root / "images", out, vae=str(root / "vae"), image_size=SIZE, flip=True, batch_size=2, shard_size=3, progress=False)
    first = np.load(out / "shard-00000.npy")
    meta = json.loads((out / METADATA_FILE).read_text())
    (out / METADATA_FILE).write_text(json.dumps({**meta, "complete": False}))
    (out / "shard-00001.npy").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        LatentDataset(out)
    mtime = (out / "shard-00000.npy").stat().st_mtime_ns
    encode_folder(root / "images", out, vae=str(root / "vae"), image_size=SIZE, flip=True, batch_size=2, shard_size=3, progress=False)
    assert (out / "shard-00000.npy").stat().st_mtime_ns == mtime  # finished shard kept
    np.testing.assert_array_equal(np.concatenate([first, np.load(out / "shard-00001.npy")]),
                                  np.concatenate([np.load(cache / "shard-00000.npy"), np.load(cache / "shard-00001.npy")]))
    with pytest.raises(ValueError, match="already holds a complete"):
        encode_folder(root / "images", out, vae=str(root / "vae"), image_size=SIZE, progress=False)


def test_clear_errors(setup, tmp_path):
    root, files, vae, cache = setup
    vae_dir = str(root / "vae")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_folder(tmp_path / "missing", tmp_path / "o1", vae=vae_dir, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        encode_folder(tmp_path / "empty", tmp_path / "o2", vae=vae_dir, progress=False)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        encode_folder(tmp_path / "bad", tmp_path / "o3", vae=vae_dir, image_size=SIZE, progress=False)
    with pytest.raises(FileNotFoundError, match="VAE path"):
        encode_folder(root / "images", tmp_path / "o4", vae=str(tmp_path / "no-vae"), progress=False)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        encode_folder(root / "images", tmp_path / "o5", vae=vae_dir, num_workers=-1, progress=False)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        _encode_cli(root / "images", tmp_path / "o6", root / "vae", "--num-workers", "-1")
    with pytest.raises(FileNotFoundError, match="no latents.json"):
        LatentDataset(root / "images")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        LatentDataset(tmp_path / "corrupt")
    with pytest.raises(ValueError, match="not a latent data set|no vae"):
        decode(torch.zeros(1, 4, 8, 8), {"source": "digits"})


@pytest.mark.heavy
def test_unreachable_hub_vae_says_how_to_pass_a_local_copy(setup, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, so no network retries), a hub id fails with advice to use --vae PATH."""
    root, files, vae, cache = setup
    code = ("from meanflow.data.latents import encode_folder; import sys; "
            "encode_folder(sys.argv[1], sys.argv[2], vae='meanflow-tests/no-such-vae', progress=False)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code, str(root / "images"), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "RuntimeError: cannot load the VAE 'meanflow-tests/no-such-vae'" in result.stderr and "--vae" in result.stderr


def test_train_on_the_cache_then_decode_samples(setup, tmp_path):
    """End to end: a few MeanFlow steps of dit-tiny/2 on the latents, then 1-NFE samples decoded to images."""
    from meanflow.sampling import generate
    from meanflow.models.loading import load_model
    from meanflow.training.trainer import train

    root, files, vae, cache = setup
    cfg = load_config(None, ["data.name=latents", f"data.path={cache}", "model.name=dit-tiny/2", "train.steps=3",
                             "train.batch_size=4", "train.checkpoint_every=3", "train.log_every=1", "eval.steps=[1]"])
    out = train(cfg, tmp_path / "run")
    model, meta = load_model(out)
    info = meta["data"]["info"]
    assert meta["data"]["kind"] == "latents" and info["latent_scale"] == SCALE and meta["model"]["kwargs"]["num_classes"] == 2
    samples, labels = generate(model, 4, tuple(meta["data"]["sample_shape"]), steps=1, num_classes=2, seed=0)
    images = decode(samples, info)
    assert samples.shape == (4, 4, SIZE // 2, SIZE // 2) and images.shape == (4, 3, SIZE, SIZE)
    assert torch.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("name, model, epochs, omega, kappa, t_end", [
    ("imagenet-b4", "dit-b/4", 80, 1.0, 0.5, 1.0), ("imagenet-b2", "dit-b/2", 240, 1.0, 0.5, 1.0),
    ("imagenet-m2", "dit-m/2", 240, 0.2, 0.92, 0.8), ("imagenet-l2", "dit-l/2", 240, 0.2, 0.92, 0.8),
    ("imagenet-xl2", "dit-xl/2", 240, 0.2, 0.92, 0.75),
])
def test_imagenet_configs(name, model, epochs, omega, kappa, t_end):
    cfg = load_config(name)
    assert cfg.model.name == model and "num_classes" not in cfg.model.kwargs
    assert (cfg.data.name, cfg.data.flip, cfg.data.conditional) == ("latents", False, True) and cfg.data.path
    assert cfg.train.steps == round(epochs * 1_281_167 / 256) and cfg.train.batch_size == 256
    assert (cfg.train.lr, cfg.train.betas, cfg.train.weight_decay, cfg.train.ema_decays) == (1e-4, [0.9, 0.95], 0.0, [0.9999])
    assert (cfg.train.optimizer, cfg.train.precision, cfg.eval.steps) == ("adam", "bf16", [1, 2])
    o = cfg.objective
    assert (o.kind, o.time_sampler, o.mu, o.sigma, o.ratio, o.weight_power, o.weight_eps) == ("meanflow", "lognorm", -0.4, 1.0, 0.25, 1.0, 0.01)
    assert (o.omega, o.kappa, o.t_start, o.t_end, o.label_drop) == (omega, kappa, 0.0, t_end, 0.1)


def test_imf_normalisation_per_channel_and_decode(setup):
    """latent_norm=imf: (z - mean_c) / std_c with the official iMF statistics, recorded in the info and undone by decode."""
    from meanflow.data.latents import IMF_LATENT_MEAN, IMF_LATENT_STD

    root, files, vae, cache = setup
    data = LatentDataset(cache, posterior="mean", normalisation="imf")
    mean, std = torch.tensor(IMF_LATENT_MEAN)[:, None, None], torch.tensor(IMF_LATENT_STD)[:, None, None]
    x, _ = data.get(torch.arange(3))
    raw, _ = LatentDataset(cache, posterior="mean").get(torch.arange(3))
    torch.testing.assert_close(x, (raw / SCALE - mean) / std, rtol=1e-6, atol=1e-6)
    assert data.info["latent_norm"] == "imf" and data.info["latent_mean"] == list(IMF_LATENT_MEAN)
    with torch.no_grad():
        expected = vae.decode(x * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decode(x, data.info, batch_size=2), expected, atol=1e-5, rtol=1e-5)
    sampled = LatentDataset(cache, seed=1, normalisation="imf")  # fresh posterior draws, normalised the same way
    assert data.info["latent_mean"] == sampled.info["latent_mean"] and not torch.equal(sampled.get(torch.arange(3))[0], x)
    cfg = load_config(None, ["data.name=latents", f"data.path={cache}", "data.latent_norm=imf"])
    assert load_dataset(cfg.data, seed=0)[0].info["latent_norm"] == "imf"
    with pytest.raises(ValueError, match="data.latent_norm must be one of vae, imf"):
        load_config(None, ["data.latent_norm=sd"])


def test_sample_cli_on_a_released_imf_checkpoint(setup, tmp_path):
    """`meanflow sample --checkpoint iMF.pth --omega --interval`: official key layout in, decoded images out.

    Released checkpoints take 4 x 32 x 32 latents; the tiny VAE decodes them to 64 x 64 images."""
    from meanflow.cli import sample as sample_cli
    from meanflow.data.latents import IMF_LATENT_MEAN, IMF_LATENT_STD
    from meanflow.models.pretrained import load_official_imf
    from meanflow.sampling import generate

    root, files, vae, cache = setup
    torch.manual_seed(0)
    ours = __import__("meanflow").models.create("imf-tiny/2", in_channels=4, input_size=32, num_classes=5, v_head=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    official = {"net." + k.replace("y_embedder.weight", "y_embedder.embedding_table._flax_embedding.weight"): v for k, v in ours.state_dict().items()}
    official = {k if "norm" in k or k.endswith(("_scale", "_tokens")) or "x_embedder" in k or "embedding_table" in k
                else k.rsplit(".", 1)[0] + "._flax_linear." + k.rsplit(".", 1)[1]: v for k, v in official.items()}
    official |= {k.replace("u_final_layer", "v_final_layer"): v for k, v in official.items() if "u_final_layer" in k}
    torch.save(official, tmp_path / "iMF-tiny.pth")
    parser = argparse.ArgumentParser()
    sample_cli.register(parser.add_subparsers())
    args = parser.parse_args(["sample", "--checkpoint", str(tmp_path / "iMF-tiny.pth"), "--steps", "2", "--num", "3", "--labels", "1,4",
                              "--omega", "2.5", "--interval", "0.1", "0.9", "--vae", str(root / "vae"), "--out", str(tmp_path / "s.npz")])
    assert args.func(args) == 0
    written = np.load(tmp_path / "s.npz")
    model = load_official_imf(tmp_path / "iMF-tiny.pth")
    latents, _ = generate(model, 3, (4, 32, 32), steps=2, labels=torch.tensor([1, 4, 1]), num_classes=5, omega=2.5, interval=(0.1, 0.9))
    with torch.no_grad():
        images = vae.decode(latents * torch.tensor(IMF_LATENT_STD)[:, None, None] + torch.tensor(IMF_LATENT_MEAN)[:, None, None]).sample
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert written["samples"].shape == (3, 64, 64, 3) and written["labels"].tolist() == [1, 4, 1]
    assert np.abs(written["samples"].astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("name, model, steps", [("imagenet-imf-b2", "imf-b/2", [1]), ("imagenet-imf-m2", "imf-m/2", [1]),
                                                ("imagenet-imf-l2", "imf-l/2", [1]), ("imagenet-imf-xl2", "imf-xl/2", [1, 2])])
def test_imagenet_imf_configs(name, model, steps):
    """The official iMF recipe: AdamW(0.9, 0.95) without decay, lr 1e-4 after 10 warm-up epochs, batch 1024, 640 epochs, EMA 0.9999, fp32."""
    cfg = load_config(name)
    assert cfg.model.name == model and cfg.eval.steps == steps
    assert (cfg.data.name, cfg.data.flip, cfg.data.latent_norm) == ("latents", False, "imf")
    per_epoch = 1_281_167 // 1024  # the official loader drops the last partial batch
    assert (cfg.train.steps, cfg.train.warmup_steps, cfg.train.batch_size) == (640 * per_epoch, 10 * per_epoch, 1024)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.betas, cfg.train.weight_decay) == ("adamw", 1e-4, [0.9, 0.95], 0.0)
    assert (cfg.train.ema_decays, cfg.train.precision, cfg.train.grad_clip) == ([0.9999], "fp32", 0.0)
    o = cfg.objective
    assert (o.kind, o.ratio, o.mu, o.sigma, o.omega_max, o.omega_beta, o.label_drop, o.weight_power, o.weight_eps) == \
        ("imf", 0.5, -0.4, 1.0, 7.0, 1.0, 0.1, 1.0, 0.01)
