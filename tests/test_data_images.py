"""Image sources (digits, folders, .npz, torchvision) and image utilities, with files written to tmp_path."""
import numpy as np
import pytest
import torch
from PIL import Image

from meanflow.config import DataConfig
from meanflow.data import load_dataset, load_digits, load_image_folder, load_npz_images, random_flip, save_grid, to_uint8
from meanflow.data.images import load_torchvision


def _save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_digits_shape_range_labels():
    data = load_digits()
    assert data.x.shape == (1797, 1, 16, 16) and data.x.dtype == torch.uint8 and data.kind == "images"
    assert data.num_classes == 10 and set(data.labels.tolist()) == set(range(10))
    x, labels = data.get(torch.arange(1797))
    assert x.min() == -1.0 and x.max() == 1.0 and labels.dtype == torch.int64
    native = load_digits(image_size=8)
    from sklearn.datasets import load_digits as sklearn_digits

    reference = np.round(sklearn_digits().images * 255 / 16)
    assert np.array_equal(native.x[:, 0].numpy(), reference)


def test_digits_split_via_load_dataset():
    train, ref = load_dataset(DataConfig(name="digits", image_size=8), seed=0)
    assert (len(train), len(ref)) == (1438, 359) and train.sample_shape == (1, 8, 8)
    pixels = torch.cat([train.x, ref.x]).flatten(1)
    assert torch.equal(pixels.sum(0), load_digits(8).x.flatten(1).sum(0, dtype=torch.int64))  # a partition
    unlabelled, _ = load_dataset(DataConfig(name="digits", conditional=False), seed=0)
    assert unlabelled.labels is None and unlabelled.num_classes == 0


def test_to_uint8_convention_and_round_trip():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 2, 3)
    out = to_uint8(x)
    assert out.shape == (1, 2, 3, 1) and out.dtype == torch.uint8
    assert out.flatten().tolist() == [0, 0, 128, 255, 255, 255]  # clamp(round((x + 1) * 127.5), 0, 255)
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1.0)[..., 0], u[:, 0])


def test_random_flip_only_where_masked():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = random_flip(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_save_grid_png(tmp_path):
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    save_grid(images, tmp_path / "out" / "grid.png", nrow=5, min_size=8)
    save_grid(images[:, :1], tmp_path / "gray.png", min_size=8)
    save_grid(images[:1], tmp_path / "big.png", min_size=32)  # small images enlarged 4x, nearest neighbour
    with Image.open(tmp_path / "big.png") as big:
        assert big.size == (32, 32)  # make_grid leaves a single image unpadded
        assert np.array_equal(np.asarray(big)[::4, ::4], to_uint8(images[:1])[0].numpy())
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.size == (5 * 10 + 2, 10 + 2)  # padding 2 around each 8x8 image
        tile = np.asarray(grid)[2:10, 2:10]
    assert np.array_equal(tile, to_uint8(images[:1])[0].numpy())
    with Image.open(tmp_path / "gray.png") as gray:
        assert gray.size == (3 * 10 + 2, 2 * 10 + 2)


def test_image_folder_classes_resize_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    _save_image(tmp_path / "imgs" / "cat" / "a.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    _save_image(tmp_path / "imgs" / "cat" / "b.jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    _save_image(tmp_path / "imgs" / "dog" / "c.bmp", rng.integers(0, 256, (10, 10), dtype=np.uint8))
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path / "imgs", image_size=8)
    assert data.x.shape == (3, 3, 8, 8) and data.x.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 1] and data.num_classes == 2 and data.info["classes"] == ["cat", "dog"]
    gray = load_image_folder(tmp_path / "imgs", image_size=8, channels=1)
    assert gray.x.shape == (3, 1, 8, 8)


def test_image_folder_decodes_one_image_at_a_time(tmp_path, monkeypatch):
    """A folder of large photos must not be held decoded at full size: each is resized before the next is read."""
    import weakref

    from meanflow.data import images as images_module

    rng = np.random.default_rng(2)
    for i in range(6):
        _save_image(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    opened, alive_at_open = [], []
    real_open = images_module._open_image

    def counting_open(file, *args, **kwargs):
        alive_at_open.append(sum(ref() is not None for ref in opened))
        image = real_open(file, *args, **kwargs)
        if kwargs.get("decode", args[0] if args else True):
            opened.append(weakref.ref(image))
        return image

    monkeypatch.setattr(images_module, "_open_image", counting_open)
    data = load_image_folder(tmp_path / "imgs", image_size=8)
    assert data.x.shape == (6, 3, 8, 8) and len(opened) == 6
    assert max(alive_at_open) == 0  # the previous full-size image is gone when the next file is opened


def test_flat_grayscale_folder_keeps_pixels(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (2, 6, 6), dtype=np.uint8)
    for i, image in enumerate(pixels):
        _save_image(tmp_path / f"{i}.png", image)
    train, ref = load_dataset(DataConfig(name="folder", path=str(tmp_path)), seed=0)
    assert ref is None and train.labels is None and train.num_classes == 0
    assert torch.equal(train.x[:, 0], torch.from_numpy(pixels))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "text" / "a").mkdir(parents=True)
    (tmp_path / "text" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "text")
    _save_image(tmp_path / "broken" / "ok.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image file.*bad.png"):
        load_image_folder(tmp_path / "broken")
    _save_image(tmp_path / "mixed" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _save_image(tmp_path / "mixed" / "b.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="different sizes.*data.image_size"):
        load_image_folder(tmp_path / "mixed")
    assert load_image_folder(tmp_path / "mixed", image_size=4).x.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="data.image_size must be a positive"):
        load_image_folder(tmp_path / "mixed", image_size=0)
    with pytest.raises(ValueError, match="data.image_size must be a positive"):
        load_digits(image_size=-8)


def test_npz_images_layouts_and_labels(tmp_path):
    nhwc = np.random.default_rng(2).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", images=nhwc, labels=np.array([0, 2, 1, 2]))
    np.savez(tmp_path / "chw.npz", nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "gray.npz", pictures=nhwc[..., 0])  # no known key: the first array
    a = load_npz_images(tmp_path / "hwc.npz")
    assert torch.equal(a.x, torch.from_numpy(nhwc).permute(0, 3, 1, 2)) and a.num_classes == 3
    assert torch.equal(load_npz_images(tmp_path / "chw.npz").x, a.x)
    assert load_npz_images(tmp_path / "gray.npz", image_size=4).x.shape == (4, 1, 4, 4)
    train, ref = load_dataset(DataConfig(name="npz", path=str(tmp_path / "hwc.npz"), conditional=False), seed=0)
    assert ref is None and train.labels is None and train.kind == "images"


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"x": np.zeros((2, 4, 4, 3), dtype=np.float32)}, "uint8"),
        ({"x": np.zeros((2, 5, 4, 4), dtype=np.uint8)}, "channel axis"),
        ({"x": np.zeros((2, 4), dtype=np.uint8)}, r"\(N, H, W, C\)"),
        ({"x": np.zeros((2, 4, 4), dtype=np.uint8), "y": np.array([0, -1])}, "non-negative"),
    ],
)
def test_npz_image_errors(tmp_path, arrays, words):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=words):
        load_npz_images(tmp_path / "bad.npz")


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_torchvision_missing_files_without_download(tmp_path, name):
    with pytest.raises(RuntimeError, match=f"cannot load {name}.*data.download=true.*{tmp_path.name}"):
        load_torchvision(name, tmp_path, train=True, download=False)
    with pytest.raises(RuntimeError, match="data.download=true"):
        load_dataset(DataConfig(name=name, path=str(tmp_path)), seed=0)
