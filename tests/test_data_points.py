"""Toy distributions, point-cloud files, load_dataset for points and the scatter plot."""
import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.config import DataConfig
from meanflow.data import TOY_DATASETS, load_dataset, load_points, sample_toy, save_points_plot, sources


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_shape_scale_and_determinism(name):
    a = sample_toy(name, 5000, torch.Generator().manual_seed(7))
    b = sample_toy(name, 5000, torch.Generator().manual_seed(7))
    c = sample_toy(name, 5000, torch.Generator().manual_seed(8))
    assert a.shape == (5000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 4.5
    assert a.mean(0).abs().max() < 0.5
    assert ((a.std(0) > 0.8) & (a.std(0) < 2.0)).all()


def test_toy_shapes_are_what_they_claim():
    g = torch.Generator().manual_seed(0)
    board = sample_toy("checkerboard", 4000, g)
    cells = board.floor() + 2  # cell indices 0..3; dark cells have even index sum
    assert ((cells.sum(1) % 2) == 0).all()
    rings = sample_toy("rings", 4000, g).norm(dim=1)
    assert (rings - rings.round()).abs().median() < 0.1
    gauss = sample_toy("8gaussians", 4000, g)
    assert (gauss.norm(dim=1) - 2).abs().median() < 0.3


def test_unknown_toy_name_lists_names():
    with pytest.raises(ValueError, match="checkerboard.*spirals"):
        sample_toy("circles", 10, torch.Generator())


def test_load_npy_npz_csv(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", points=x, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "c.npz", x)  # arr_0, no labels
    (tmp_path / "d.csv").write_text("u,label,v\n0,1,1\n2,0,3\n4,1,5\n")
    (tmp_path / "e.csv").write_text("0.5,1\n2,3e-1\n")
    pts, labels = load_points(tmp_path / "a.npy")
    assert pts.dtype == torch.float32 and torch.equal(pts, torch.from_numpy(x).float()) and labels is None
    pts, labels = load_points(tmp_path / "b.npz")
    assert torch.equal(labels, torch.tensor([0, 1, 2, 0, 1, 2])) and pts.shape == (6, 2)
    assert load_points(tmp_path / "c.npz")[1] is None
    pts, labels = load_points(tmp_path / "d.csv")
    assert torch.equal(pts, torch.tensor([[0.0, 1], [2, 3], [4, 5]])) and torch.equal(labels, torch.tensor([1, 0, 1]))
    pts, labels = load_points(tmp_path / "e.csv")
    assert torch.allclose(pts, torch.tensor([[0.5, 1.0], [2.0, 0.3]])) and labels is None


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content) if name.endswith(".npy") else np.savez(path, **content)
    return path


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.csv", "", "empty"),
        ("header.csv", "x,y\n", "no data rows"),
        ("text.csv", "1,2\n3,abc\n", "line 2, column 2: non-numeric"),
        ("ragged.csv", "1,2\n3\n", "line 2: expected 2 columns"),
        ("nan.csv", "1,2\n3,4\nnan,5\n7,inf\n", "2 NaN or inf values in 2 rows; the first is row 2"),
        ("ndim.npy", np.zeros((2, 3, 4)), r"shape \(N, D\)"),
        ("vector.npy", np.zeros(5), r"shape \(N, D\)"),
        ("zero.npy", np.zeros((0, 3)), "empty"),
        ("strings.npy", np.array([["a", "b"]]), "numeric"),
        ("nan.npz", {"x": np.array([[0.0, 1.0], [np.inf, 0.0]])}, "1 NaN or inf values in 1 rows; the first is row 1"),
        ("badlabels.npz", {"x": np.zeros((3, 2)), "y": np.array([0, 1.5, 2])}, "non-negative integers"),
        ("shortlabels.npz", {"x": np.zeros((3, 2)), "y": np.array([0, 1])}, r"labels must have shape \(3,\)"),
        ("points.txt", "1 2\n", "suffix must be one of .npy, .npz, .csv"),
    ],
)
def test_point_file_errors(tmp_path, name, content, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=words):
        load_points(path)


def test_unreadable_npy_and_missing_file(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="junk.npy.*not a readable"):
        load_points(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_points(tmp_path / "missing.npy")


def test_load_dataset_points_holdout_and_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.savez(tmp_path / "p.npz", x=x, labels=np.arange(50) % 4)
    cfg = DataConfig(name="points", path=str(tmp_path / "p.npz"), holdout=1000)
    train, ref = load_dataset(cfg, seed=0)
    assert (len(train), len(ref)) == (40, 10)  # min(holdout, N // 5)
    assert train.kind == "points" and train.sample_shape == (3,) and train.num_classes == 4
    both = torch.cat([train.x, ref.x]).double()
    assert torch.allclose(both.sort(0).values, torch.from_numpy(x).sort(0).values, atol=1e-6)  # a partition of the file
    again, _ = load_dataset(cfg, seed=0)
    other, _ = load_dataset(cfg, seed=1)
    assert torch.equal(again.x, train.x) and not torch.equal(other.x, train.x)
    xs, labels = train.get(torch.tensor([0, 1]))
    assert xs.dtype == torch.float32 and labels.dtype == torch.int64
    plain, plain_ref = load_dataset(DataConfig(name="points", path=cfg.path, holdout=3, conditional=False), seed=0)
    assert plain.labels is None and plain.num_classes == 0 and len(plain_ref) == 3 and plain_ref.labels is None


def test_load_dataset_toy_train_and_reference_differ():
    train, ref = load_dataset(DataConfig(name="moons", num_samples=300, holdout=200), seed=5)
    assert train.x.shape == (300, 2) and ref.x.shape == (200, 2) and train.kind == "points"
    assert not torch.equal(train.x[:200], ref.x)
    assert torch.equal(load_dataset(DataConfig(name="moons", num_samples=300, holdout=200), seed=5)[1].x, ref.x)
    assert load_dataset(DataConfig(name="moons", num_samples=10, holdout=0), seed=5)[1] is None


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="unknown data set 'nope'.*checkerboard.*points.*digits.*cifar10"):
        load_dataset(DataConfig(name="nope"), seed=0)
    with pytest.raises(ValueError, match="data.path"):
        load_dataset(DataConfig(name="points"), seed=0)
    assert {"points", "digits", "folder", "npz", "cifar10", "mnist", *TOY_DATASETS} <= set(sources())


@pytest.mark.parametrize("dim", [2, 4])
def test_save_points_plot_writes_side_by_side_png(tmp_path, dim):
    samples = torch.randn(200, dim)
    save_points_plot(samples, tmp_path / "plots" / "s.png", reference=samples + 1, title="test")
    save_points_plot(samples.numpy(), tmp_path / "single.png")
    with Image.open(tmp_path / "plots" / "s.png") as pair, Image.open(tmp_path / "single.png") as single:
        assert pair.format == "PNG" and pair.width > 1.8 * single.width
