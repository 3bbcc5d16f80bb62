"""InceptionFeatures on randomly initialised weights saved in the layout of the standard FID file."""
import pytest
import torch
import torchvision

from meanflow.metrics import inception
from meanflow.metrics.inception import InceptionFeatures


def _random_fid_inception_state_dict() -> dict[str, torch.Tensor]:
    """Random weights with exactly the keys and shapes of pt_inception-2015-12-05 (torchvision's
    Inception3 with 1008 classes and no aux head). Batch-norm statistics are set from one random
    batch so that activations stay O(1) through the depth of the net."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the stats of the single batch below
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, 299, 299) * 2 - 1)
    return net.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_random_fid_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights_file):
    return InceptionFeatures(weights_file, device="cpu")


def test_odd_sizes_grayscale_and_layouts(extractor):
    gen = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (2, 28, 28, 1), generator=gen, dtype=torch.uint8)  # NHWC grayscale
    out = extractor(gray)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["pool"]).all() and out["pool"].std(0).mean() > 0
    rgb_nchw = gray.permute(0, 3, 1, 2).repeat(1, 3, 1, 1)  # the same images, RGB channels-first
    torch.testing.assert_close(extractor(rgb_nchw)["pool"], out["pool"])
    rgb = torch.randint(0, 256, (2, 40, 40, 3), generator=gen, dtype=torch.uint8)
    assert extractor(rgb)["pool"].shape == (2, 2048)


@pytest.mark.heavy
def test_matches_pytorch_fid_network(extractor, weights_file, monkeypatch):
    # Independent implementation of the same TF-ported architecture: pytorch-fid's InceptionV3, fed
    # our weights instead of its download. At 299x299 no resize happens in either.
    import pytorch_fid.inception

    state = torch.load(weights_file, weights_only=True)
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid.inception.InceptionV3([3], resize_input=False, normalize_input=True).eval()
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    unit = ((images.float() - 128) / 128 + 1) / 2  # pytorch-fid maps [0, 1] -> 2x - 1 = (u - 128) / 128
    with torch.no_grad():
        expected = reference(unit)[0].flatten(1)  # (2, 2048)
    out = extractor(images)
    torch.testing.assert_close(out["pool"], expected, rtol=1e-4, atol=1e-4)
    logits = expected @ state["fc.weight"].T  # unbiased logits, the Inception Score convention
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-3)


def test_rejects_float_images(extractor):
    with pytest.raises(TypeError, match="to_uint8"):
        extractor(torch.zeros(1, 3, 8, 8))


def test_missing_weights_error_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="MEANFLOW_INCEPTION_WEIGHTS") as info:
        InceptionFeatures(download=False)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(info.value)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="MEANFLOW_INCEPTION_WEIGHTS"):
        InceptionFeatures()


def test_env_var_and_wrong_file(weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights_file))
    assert inception.resolve_inception_weights() == weights_file
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(RuntimeError, match="does not hold the FID Inception weights"):
        InceptionFeatures(wrong)


def test_inception_score_against_numpy_and_closed_forms():
    import numpy as np
    from scipy.special import softmax

    from meanflow.metrics import inception_score

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((103, 7)) * 3
    expected = []
    for i in range(10):  # contiguous parts [i N / 10, (i + 1) N / 10), as Salimans et al.
        p = softmax(logits[i * 103 // 10 : (i + 1) * 103 // 10], axis=1)
        expected.append(np.exp(np.mean(np.sum(p * np.log(p / p.mean(0)), axis=1))))
    mean, std = inception_score(torch.from_numpy(logits), splits=10)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12) and std == pytest.approx(np.std(expected), rel=1e-9)
    confident = 200.0 * torch.eye(10).repeat(10, 1)  # every split: 10 classes, each once, predicted surely
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-9)
    assert inception_score(torch.ones(20, 5))[0] == pytest.approx(1.0, rel=1e-12)


def test_compute_image_metrics_with_stub_extractor():
    import numpy as np

    from meanflow.metrics import compute_image_metrics, feature_statistics, frechet_distance, inception_score

    def extractor(images):  # uint8 (N, C, H, W) -> simple deterministic features
        x = images.double().flatten(1) / 255
        return {"pool": x[:, :6], "logits": x[:, :4] * 5}

    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 4, 4, 3), generator=gen, dtype=torch.uint8)  # NHWC
    reference = torch.rand(50, 6, generator=gen, dtype=torch.float64)
    ref_stats = feature_statistics(reference)
    features = extractor(images.permute(0, 3, 1, 2))
    metrics = compute_image_metrics(images, ref_stats, extractor, batch_size=7, reference_features=reference)
    assert metrics["num_samples"] == 40
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_statistics(features["pool"]), *ref_stats), rel=1e-9)
    assert metrics["inception_score"] == pytest.approx(inception_score(features["logits"])[0], rel=1e-6)
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    streamed = compute_image_metrics((b.numpy() for b in images.split(9)), ref_stats, extractor)
    assert streamed["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
    with pytest.raises(TypeError, match="to_uint8"):
        compute_image_metrics(images.float(), ref_stats, extractor)
    assert np.isfinite(metrics["inception_score_std"])


@pytest.mark.heavy
def test_fid_stats_cli_with_inception(extractor, weights_file, tmp_path):
    import argparse

    import numpy as np

    from meanflow.cli import fid_stats
    from meanflow.metrics import feature_statistics, load_stats

    images = torch.randint(0, 256, (3, 28, 28), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images.numpy(), arr_1=np.arange(3))  # ADM sample layout
    parser = argparse.ArgumentParser()
    fid_stats.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fid-stats", str(tmp_path / "images.npz"), "--weights", str(weights_file),
                              "--device", "cpu", "--out", str(tmp_path / "ref.npz")])
    assert args.func(args) == 0
    mu, sigma = load_stats(tmp_path / "ref.npz")
    mu_ref, sigma_ref = feature_statistics(extractor(images)["pool"])
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-4)
