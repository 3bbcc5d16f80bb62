"""The project's digits classifier: accuracy, determinism, caching and its Frechet distance."""
import pytest
import torch

from meanflow.data.images import load_digits
from meanflow.metrics import DigitsClassifier, compute_image_metrics, digits_frechet, feature_statistics
from meanflow.metrics.digits_classifier import CACHE_ENV, digits_split


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("meanflow_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return DigitsClassifier.load_or_train(cache_dir=cache_dir)


def test_heldout_accuracy(classifier):
    _, _, x_test, y_test = digits_split(classifier.size)
    accuracy = classifier.accuracy(x_test, y_test)
    assert accuracy >= 0.95
    assert accuracy == classifier.heldout_accuracy
    assert classifier.predict(x_test).dtype == torch.int64


def test_training_is_deterministic_and_cached(classifier, cache_dir, monkeypatch):
    retrained = DigitsClassifier.train()
    for name, value in classifier.net.state_dict().items():
        assert torch.equal(value, retrained.net.state_dict()[name]), name
    files = list(cache_dir.glob("digits_classifier_*.safetensors"))
    assert len(files) == 1
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    monkeypatch.setattr(DigitsClassifier, "train", None)  # loading must not train again
    loaded = DigitsClassifier.load_or_train()
    assert loaded.heldout_accuracy == classifier.heldout_accuracy
    for name, value in classifier.net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[name]), name


def test_frechet_separates_real_from_noise(classifier):
    data = load_digits(16)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    half_a, _ = data.get(order[:800])  # (800, 1, 16, 16) in [-1, 1]
    half_b = data.x[order[800:1600]]  # the other half as uint8: the classifier maps it itself
    noise = torch.rand(800, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_vs_real = digits_frechet(half_a, half_b, classifier)
    real_vs_noise = digits_frechet(half_a, noise, classifier)
    assert real_vs_real < 0.05 * real_vs_noise
    # Other resolutions are resized to the classifier's native 16 x 16.
    assert digits_frechet(load_digits(8).x[order[800:1600]], half_a, classifier) < 0.2 * real_vs_noise


def test_classifier_is_a_feature_extractor(classifier):
    data = load_digits(16)
    reference = classifier.features(data.x[:900])
    assert reference.shape == (900, 128)
    metrics = compute_image_metrics(data.x[900:], feature_statistics(reference), classifier, reference_features=reference)
    assert metrics["num_samples"] == len(data) - 900
    assert 8.0 < metrics["inception_score"] <= 10.0  # confident, balanced predictions over 10 classes
    assert metrics["precision"] > 0.6 and metrics["recall"] > 0.6  # same distribution, k = 3 manifolds
    noise = torch.randint(0, 256, (300, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    noisy = compute_image_metrics(noise, feature_statistics(reference), classifier, reference_features=reference)
    assert noisy["precision"] < 0.1 and noisy["fid"] > 10 * metrics["fid"]


def _fid_stats(argv):
    import argparse

    from meanflow.cli import fid_stats

    parser = argparse.ArgumentParser()
    fid_stats.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fid-stats", *argv])
    return args.func(args)


def test_fid_stats_cli_sources_agree(classifier, cache_dir, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from meanflow.metrics import load_stats

    monkeypatch.setenv(CACHE_ENV, str(cache_dir))  # the classifier trained above, no retraining
    images = load_digits(16).x[:300]  # uint8 (300, 1, 16, 16)
    assert _fid_stats(["digits", "--feature", "digits", "--num", "300", "--out", str(tmp_path / "a.npz")]) == 0
    np.savez(tmp_path / "samples.npz", samples=images.permute(0, 2, 3, 1).numpy())  # NHWC
    _fid_stats([str(tmp_path / "samples.npz"), "--feature", "digits", "--out", str(tmp_path / "b.npz")])
    for i, image in enumerate(images[:, 0].numpy()):  # nested folders are searched too
        (tmp_path / "png" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "png" / str(i % 3) / f"{i:04d}.png")
    _fid_stats([str(tmp_path / "png"), "--feature", "digits", "--batch-size", "64", "--out", str(tmp_path / "c.npz")])
    mu, sigma = feature_statistics(classifier.features(images))
    for name in "abc":  # the folder is read in another order: same statistics up to round-off
        mu_l, sigma_l = load_stats(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(mu_l, mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma_l, sigma, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="SOURCE"):
        _fid_stats([str(tmp_path / "missing"), "--feature", "digits", "--out", str(tmp_path / "d.npz")])
