"""A run's evaluation end to end: every number of ``metrics.json`` recomputed here, independently.

The recomputation shares only the documented inputs with the package: the EMA weights file, the
held-out data, the sampling noise of batch i drawn from the (seed, i, "sample") stream and the
evaluation labels drawn from the (seed, 0, "labels") stream. The
samplers, the uint8 conversion, sliced W2, energy distance, FID and Inception Score are written
again below in a few lines of numpy / scipy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
from safetensors.torch import load_file

from meanflow.cli import main
from meanflow.config import load_config
from meanflow.data import load_dataset
from meanflow.evaluation import images as evaluation_images
from meanflow.models import create
from meanflow.runtime import checkpoint as ckpt
from meanflow.runtime.seeding import step_generator

TOY = ["--config", "toy", "model.kwargs={width: 32, depth: 2}", "data.num_samples=2048", "data.holdout=300",
       "train.batch_size=64", "train.device=cpu", "train.steps=3", "train.checkpoint_every=3", "train.warmup_steps=0",
       "train.ema_decays=[0.5]", "eval.num_samples=200", "eval.baseline_ode_steps=5", "eval.steps=[1, 3]"]


# ---- independent samplers and metrics ---------------------------------------------------------


def _times(steps: int) -> list[float]:
    return [1.0 - i / steps for i in range(steps + 1)]


@torch.no_grad()
def _meanflow(model, z: torch.Tensor, steps: int, labels=None) -> torch.Tensor:
    """z <- z - (t - s) u(z, s, t) over the uniform grid from t = 1 down to 0."""
    times, ones = _times(steps), torch.ones(z.shape[0])
    for t, s in zip(times, times[1:]):
        z = z - (t - s) * model(z, ones * s, ones * t, labels)
    return z


@torch.no_grad()
def _ode(model, z: torch.Tensor, steps: int, heun: bool = False) -> torch.Tensor:
    """Euler / Heun (no corrector on the last step into t = 0) on dz/dt = u(z, t, t)."""
    times, ones = _times(steps), torch.ones(z.shape[0])
    for t, s in zip(times, times[1:]):
        v = model(z, ones * t, ones * t)
        if heun and s > 0:
            v = (v + model(z + (s - t) * v, ones * s, ones * s)) / 2
        z = z + (s - t) * v
    return z


def _energy(x: np.ndarray, y: np.ndarray) -> float:
    d = scipy.spatial.distance.cdist
    return float(np.sqrt(max(2 * d(x, y).mean() - d(x, x).mean() - d(y, y).mean(), 0.0)))


def _sliced_w2(x: np.ndarray, y: np.ndarray, seed: int, projections: int = 512) -> float:
    """Equal-size clouds: mean over directions of the mean squared gap between sorted projections."""
    theta = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    gaps = np.sort(x @ theta, axis=0) - np.sort(y @ theta, axis=0)
    return float(np.sqrt((gaps**2).mean()))


def _fid(a: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    mu_a, sigma_a = a.mean(0), np.cov(a, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma).real
    return float(((mu_a - mu) ** 2).sum() + np.trace(sigma_a + sigma - 2 * root))


def _inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    scores = []
    for part in np.array_split(logits, splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0, keepdims=True)
        scores.append(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _ema_model(run: Path) -> torch.nn.Module:
    directory = ckpt.resolve_checkpoint(run)
    spec = json.loads((directory / "meta.json").read_text())["model"]
    model = create(spec["name"], **spec["kwargs"])
    model.load_state_dict(load_file(str(directory / "ema.safetensors")))
    return model.eval()


def _noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=step_generator(seed, 0, "sample"))


# ---- point clouds -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    assert main(["train", "--out", str(run), *TOY]) == 0
    return run


def test_metrics_json_of_a_toy_run_recomputed(toy_run):
    metrics = json.loads((toy_run / "metrics.json").read_text())
    cfg = load_config(str(toy_run / "config.yaml"))
    assert (metrics["weights"], metrics["step"], metrics["num_samples"]) == ("ema", 3, 200)
    seed = metrics["seed"]
    assert seed == cfg.seed + 1
    train_set, reference = load_dataset(cfg.data, cfg.seed)
    ref = reference.get(torch.arange(200))[0].double().numpy()
    model, e = _ema_model(toy_run), _noise(seed, (200, 2))
    expected = {
        "meanflow_1nfe": (1, _meanflow(model, e, 1)),
        "meanflow_3nfe": (3, _meanflow(model, e, 3)),
        "euler_5nfe": (5, _ode(model, e, 5)),
        "data_floor": (0, train_set.get(torch.arange(200))[0]),
    }
    assert set(metrics["results"]) == set(expected)
    for name, (nfe, samples) in expected.items():
        got, x = metrics["results"][name], samples.double().numpy()
        assert got["nfe"] == nfe, name
        assert got["sliced_w2"] == pytest.approx(_sliced_w2(x, ref, seed), rel=1e-5), name
        assert got["energy_distance"] == pytest.approx(_energy(x, ref), rel=1e-5), name
    assert (toy_run / "samples.png").stat().st_size > 0


def test_eval_heun_recomputed(toy_run, tmp_path):
    out = tmp_path / "heun.json"
    assert main(["eval", "--run", str(toy_run), "--method", "heun", "--steps", "3", "--num", "150", "--seed", "11", "--out", str(out)]) == 0
    cfg = load_config(str(toy_run / "config.yaml"))
    ref = load_dataset(cfg.data, cfg.seed)[1].get(torch.arange(150))[0].double().numpy()
    entry = json.loads(out.read_text())["results"]["heun_3nfe"]
    x = _ode(_ema_model(toy_run), _noise(11, (150, 2)), 3, heun=True).double().numpy()
    assert entry["nfe"] == 5
    assert entry["sliced_w2"] == pytest.approx(_sliced_w2(x, ref, 11), rel=1e-5)
    assert entry["energy_distance"] == pytest.approx(_energy(x, ref), rel=1e-5)


# ---- images: eval --fid-stats ---------------------------------------------------------------------


class ProjectionFeatures:
    """A cheap stand-in for the Inception network with its interface: uint8 images -> pool, logits.

    The network itself is checked against pytorch-fid in test_inception.py; here the point is the
    pipeline around it (samples, uint8, statistics, FID against the file, Inception Score).
    """

    def __init__(self, *args, **kwargs):
        gen = torch.Generator().manual_seed(123)
        self.pool = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        self.head = torch.randn(6, 5, generator=gen, dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1:] == (8, 8, 1), (images.dtype, images.shape)
        pool = torch.tanh(images.reshape(images.shape[0], -1).double() / 255 @ self.pool)
        return {"pool": pool.float(), "logits": (3 * pool @ self.head).float()}


def test_eval_fid_stats_of_an_image_run_recomputed(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation_images, "InceptionFeatures", ProjectionFeatures)
    run = tmp_path / "digits"
    assert main(["train", "--out", str(run), "--config", "digits", "--no-eval", "train.steps=2", "train.batch_size=8",
                 "train.checkpoint_every=2", "train.device=cpu", "train.ema_decays=[0.5]", "model.kwargs={model_channels: 8, attn_resolutions: []}"]) == 0
    rng = np.random.default_rng(0)
    mu, root = rng.normal(size=6) * 0.1, rng.normal(size=(6, 6)) * 0.3
    sigma = root @ root.T
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    out = tmp_path / "m.json"
    assert main(["eval", "--run", str(run), "--steps", "2", "--num", "30", "--batch-size", "16", "--method", "meanflow",
                 "--seed", "5", "--fid-stats", str(tmp_path / "ref.npz"), "--save-samples", str(tmp_path / "s"),
                 "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["results"]["meanflow_2nfe"]

    model = _ema_model(run)
    labels = torch.randint(10, (30,), generator=step_generator(5, 0, "labels"))  # uniform classes, documented stream
    batches = []
    for i, start in enumerate(range(0, 30, 16)):
        n = min(16, 30 - start)
        noise = torch.randn((n, 1, 8, 8), generator=step_generator(5, i, "sample"))
        batches.append(_meanflow(model, noise, 2, labels[start:start + n]))
    pixels = ((torch.cat(batches) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    saved = np.load(tmp_path / "s_meanflow_2nfe.npz")
    np.testing.assert_array_equal(saved["samples"], pixels.numpy())
    np.testing.assert_array_equal(saved["labels"], labels.numpy())
    features = ProjectionFeatures()(pixels)
    pool, logits = features["pool"].double().numpy(), features["logits"].double().numpy()
    assert entry["nfe"] == 2 and entry["num_samples"] == 30
    assert entry["fid"] == pytest.approx(_fid(pool, mu, sigma), rel=1e-6)
    score, spread = _inception_score(logits)
    assert entry["inception_score"] == pytest.approx(score, rel=1e-6)
    assert entry["inception_score_std"] == pytest.approx(spread, rel=1e-6, abs=1e-9)
    assert 0 <= entry["class_accuracy"] <= 1 and entry["digits_fd"] > 0


# ---- images: the evaluation at the end of meanflow train ------------------------------------------

FOLDER_RUN = ["train", "--config", "digits", "data.name=folder", "data.image_size=8", "train.steps=2", "train.batch_size=8",
              "train.checkpoint_every=2", "train.device=cpu", "train.ema_decays=[0.5]", "eval.num_samples=20",
              "eval.batch_size=16", "eval.steps=[1]", "model.kwargs={model_channels: 8, attn_resolutions: []}"]


def _photo_folder(root: Path) -> Path:
    """A user's photos: two class folders of grayscale images of assorted sizes (resized to 8x8 on loading)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (10 + i, 12, 1), dtype=np.uint8)[..., 0]).save(root / label / f"{i}.png")
    return root


def test_train_on_an_image_folder_without_statistics_ends_with_a_preview_and_a_note(tmp_path, capsys):
    """No metric applies (not digits, no eval.fid_stats): the run still exits 0, with the preview and what to do."""
    run = tmp_path / "run"
    assert main([*FOLDER_RUN, f"data.path={_photo_folder(tmp_path / 'photos')}", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["results"] == {} and "eval.fid_stats=REF.npz" in metrics["note"] and (run / "samples.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 2  # asked for explicitly, nothing to compute is an error
    assert "no image metric applies" in capsys.readouterr().err


@pytest.mark.heavy
def test_train_with_eval_fid_stats_scores_fid_as_meanflow_eval_does(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation_images, "InceptionFeatures", ProjectionFeatures)
    rng = np.random.default_rng(1)
    root = rng.normal(size=(6, 6)) * 0.3
    np.savez(tmp_path / "ref.npz", mu=rng.normal(size=6) * 0.1, sigma=root @ root.T)
    run = tmp_path / "run"
    assert main([*FOLDER_RUN, f"data.path={_photo_folder(tmp_path / 'photos')}", f"eval.fid_stats={tmp_path / 'ref.npz'}",
                 "--out", str(run)]) == 0
    at_end = json.loads((run / "metrics.json").read_text())["results"]["meanflow_1nfe"]
    assert main(["eval", "--run", str(run), "--fid-stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["results"]["meanflow_1nfe"]
    assert at_end["fid"] > 0 and at_end["fid"] == again["fid"] and at_end["inception_score"] == again["inception_score"]


@pytest.mark.parametrize("data, message", [("image", "no such file"), ("points", "apply to image runs")])
def test_eval_fid_stats_is_checked_before_training(tmp_path, capsys, data, message):
    if data == "image":
        args = [*FOLDER_RUN, f"data.path={_photo_folder(tmp_path / 'photos')}", f"eval.fid_stats={tmp_path / 'missing.npz'}"]
    else:
        np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
        args = ["train", "--config", "toy", "train.steps=2", f"eval.fid_stats={tmp_path / 'ref.npz'}"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoints/*"))  # refused before the first step
