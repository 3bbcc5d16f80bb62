"""Released pMF checkpoints: written here in the official layout with flax / Orbax, read by
``from_pretrained`` and ``meanflow sample``, and by hub id from a huggingface_hub cache (offline).

The reference is the official network written again in flax (tests/pmf_reference.py); its params,
saved by ``flax.training.checkpoints`` as the official training code saves its ``TrainState``, are
the checkpoint. Our MiT filled from it must give the reference's outputs (float32, rel <= 1e-5).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

flax = pytest.importorskip("flax")
jax = pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")

import pmf_reference as official  # noqa: E402

from meanflow.cli import main  # noqa: E402
from meanflow.data.images import to_uint8  # noqa: E402
from meanflow.models.hub import HubError  # noqa: E402
from meanflow.models.pmf_weights import OFFICIAL_EMA, architecture, choose_weights, official_preset, shapes_of  # noqa: E402
from meanflow.models.pretrained import PretrainedError, from_pretrained, load_pretrained  # noqa: E402
from meanflow.runtime.seeding import step_generator  # noqa: E402

SMALL = dict(size=16, patch=4, hidden=64, depth=4, heads=4, head_depth=2, bottleneck=16, classes=10)  # pmf-tiny/4 sizes
EMAS = (500, 1000, 2000)


def random_params(config: dict, seed: int) -> dict:
    """Params of the reference network in the official tree, every entry random (gates and outputs too)."""
    shapes = jax.eval_shape(official.PixelMeanFlow(config).init, jax.random.PRNGKey(0), *official.example_inputs(1, config["size"]))
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda a: (0.2 * rng.randn(*a.shape)).astype(np.float32), shapes["params"])


def save(workdir: Path, state: dict) -> Path:
    """``flax.training.checkpoints.save_checkpoint`` with Orbax, as the official training code; returns the work directory."""
    from flax.training import checkpoints

    checkpoints.save_checkpoint(str(workdir.resolve()), state, int(state["step"]), overwrite=True)
    return workdir


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Two checkpoints in the official layout: an inference one (no v-head, one EMA) and a full one
    (v-head, three EMDs keyed by half-life, optimizer state), plus the params they hold."""
    root = tmp_path_factory.mktemp("pmf")
    infer_cfg, full_cfg = {**SMALL, "eval": True}, {**SMALL, "eval": False}
    ema_infer = random_params(infer_cfg, 1)
    infer = save(root / "pMF-tiny", {"step": 7, "params": random_params(infer_cfg, 2), "opt_state": {}, "ema_params": {2000: ema_infer}})
    full_params = random_params(full_cfg, 3)
    emas = {k: random_params(full_cfg, 10 + i) for i, k in enumerate(EMAS)}
    full = save(root / "pMF-tiny-full", {"step": 9, "params": full_params, "opt_state": {"mu": full_params, "count": np.int32(9)}, "ema_params": emas})
    return {"infer": infer, "full": full, "ema_infer": ema_infer, "emas": emas, "full_params": full_params, "root": root}


def inputs(batch: int = 3):
    rng = np.random.RandomState(5)
    x = rng.randn(batch, 16, 16, 3).astype(np.float32)
    t = np.array([0.9, 0.3, 0.02], np.float32)[:batch]
    h = np.array([0.5, 0.3, 0.0], np.float32)[:batch]
    omega, t_min, t_max = np.array([1.0, 3.5, 7.0], np.float32)[:batch], np.full(batch, 0.1, np.float32), np.full(batch, 0.7, np.float32)
    return x, t, h, omega, t_min, t_max, np.array([1, 10, 4], np.int32)[:batch]


def reference(params: dict, eval: bool, args=None):
    return official.PixelMeanFlow({**SMALL, "eval": eval}).apply({"params": params}, *(args or inputs()))


def ours(model, args=None, return_v=False):
    x, t, h, omega, t_min, t_max, y = args or inputs()
    z, t = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)
    with torch.no_grad():
        out = model(z, t - torch.from_numpy(h), t, torch.from_numpy(y).long(), omega=torch.from_numpy(omega),
                    t_min=torch.from_numpy(t_min), t_max=torch.from_numpy(t_max), return_v=return_v)
    return tuple(o.permute(0, 2, 3, 1).numpy() for o in (out if return_v else (out,)))


def assert_same(out: np.ndarray, ref) -> None:
    ref = np.asarray(ref)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_inference_checkpoint_gives_the_official_networks_outputs(released, capsys):
    model = from_pretrained(released["infer"])
    assert "format pmf-official" in capsys.readouterr().out
    assert not model.has_v_head and model.noise_scale == 1.0
    assert_same(ours(model)[0], reference(released["ema_infer"], eval=True)[0])


@pytest.mark.parametrize("weights, key", [("ema500", 500), ("ema1000", 1000), ("ema2000", 2000), ("model", None)])
def test_full_checkpoint_gives_both_heads_of_each_weights(released, weights, key):
    loaded = load_pretrained(released["full"], weights=weights)
    params = released["full_params"] if key is None else released["emas"][key]
    u_ref, v_ref = reference(params, eval=False)
    u, v = ours(loaded.model, return_v=True)
    assert loaded.model.has_v_head and loaded.info["step"] == 9
    assert_same(u, u_ref)
    assert_same(v, v_ref)


def test_default_is_the_official_ema_or_the_only_one(released):
    assert load_pretrained(released["infer"]).weights.startswith("ema_params[2000]")
    with pytest.raises(PretrainedError, match=r"EMAs ema500, ema1000, ema2000 and none is the official choice.*weights="):
        load_pretrained(released["full"])  # a size of no released model: which EMA is not ours to guess
    # the official evaluation configs (configs/eval_config.yml of branches main and hsdp): emas per model
    assert OFFICIAL_EMA == {"pmf-b/16": "2000", "pmf-b/32": "2000", "pmf-l/16": "1000", "pmf-l/32": "2000", "pmf-h/16": "1000", "pmf-h/32": "500"}
    choices = {f"ema{k}": ("ema_params", str(k)) for k in EMAS} | {"model": ("params",)}
    assert {p: choose_weights("ema", choices, p, "f") for p in OFFICIAL_EMA} == {p: f"ema{k}" for p, k in OFFICIAL_EMA.items()}
    with pytest.raises(PretrainedError, match=r"has no weights 'ema3'; it holds: ema500, ema1000, ema2000, model"):
        choose_weights("ema3", choices, None, "f")


def test_official_sizes_are_recognised_from_shapes_alone():
    """The official networks' trees (shapes only, nothing allocated) map onto our presets."""
    names = {"pmfDiT_B_16": "pmf-b/16", "pmfDiT_L_16": "pmf-l/16", "pmfDiT_H_16": "pmf-h/16",
             "pmfDiT_B_32": "pmf-b/32", "pmfDiT_L_32": "pmf-l/32", "pmfDiT_H_32": "pmf-h/32"}
    for theirs, preset in names.items():
        config = official.official_config(theirs, eval=True)
        shapes = jax.eval_shape(official.PixelMeanFlow(config).init, jax.random.PRNGKey(0), *official.example_inputs(1, config["size"]))
        arch = architecture(shapes_of(shapes["params"]["net"]))
        assert official_preset(arch) == preset and arch["num_classes"] == 1000 and not arch["v_head"]


def test_zip_as_downloaded_and_relative_paths(released, tmp_path, monkeypatch):
    archive = shutil.make_archive(str(tmp_path / "pMF-tiny"), "zip", released["root"], "pMF-tiny")  # a top folder, as unzip -d shows
    monkeypatch.chdir(tmp_path)
    expected = reference(released["ema_infer"], eval=True)[0]
    for path in (Path(archive).name, "../" + tmp_path.name + "/" + Path(archive).name):
        assert_same(ours(from_pretrained(path, verbose=False))[0], expected)
    (tmp_path / "ckpt").symlink_to(released["infer"])
    step = next((tmp_path / "ckpt").iterdir()).name
    for path in ("ckpt", f"ckpt/{step}", f"./ckpt/{step}"):
        assert_same(ours(from_pretrained(path, verbose=False))[0], expected)


def test_wrong_preset_and_unknown_layout_are_refused(released, tmp_path):
    with pytest.raises(PretrainedError, match=r"holds a pMF MiT of no official size \(.*hidden 64.*\), not pmf-b/16"):
        load_pretrained(released["infer"], preset="pmf-b/16")
    odd = save(tmp_path / "odd", {"step": 1, "params": {"net": {"encoder": {"kernel": np.ones((2, 2), np.float32)}}}})
    with pytest.raises(PretrainedError, match=r"flax checkpoint of an unknown layout: its params hold encoder"):
        load_pretrained(odd)
    from meanflow.models import load_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match=r"empty is in none of the known checkpoint formats"):
        load_model(tmp_path / "empty")  # what meanflow sample --checkpoint reads
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(PretrainedError, match=r"broken.zip is a zip archive that cannot be unpacked \(BadZipFile: .*download it again"):
        load_pretrained(broken)


def test_cli_samples_the_released_weights_as_the_official_sampler(released, tmp_path):
    """One step from noise: x = e - u(e, h = 1, t = 1) of the reference, with the guidance asked for."""
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(released["infer"]), "--num", "3", "--labels", "1,4,7", "--omega", "2.5",
                 "--interval", "0.2", "0.6", "--out", str(out), "--batch-size", "3"]) == 0
    noise = torch.randn((3, 3, 16, 16), generator=step_generator(0, 0, "sample")).permute(0, 2, 3, 1).numpy()
    ones = np.ones(3, np.float32)
    u = reference(released["ema_infer"], eval=True, args=(noise, ones, ones, 2.5 * ones, 0.2 * ones, 0.6 * ones, np.array([1, 4, 7], np.int32)))[0]
    expected = to_uint8(torch.from_numpy(noise - np.asarray(u)).permute(0, 3, 1, 2)).numpy()
    got = np.load(out)
    assert got["samples"].shape == (3, 16, 16, 3) and list(got["labels"]) == [1, 4, 7]
    assert np.abs(got["samples"].astype(int) - expected.astype(int)).max() <= 1


# --- by hub id, from a huggingface_hub cache written in its own layout (no network) ------------------------

def put_in_cache(cache: Path, repo_id: str, filename: str, source: Path) -> None:
    """The file as ``hf_hub_download`` leaves it: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit, etag = "a" * 40, "b" * 64
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, repo / "blobs" / etag)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / filename).symlink_to(Path("../../blobs") / etag)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_loads_a_cached_file_offline(released, tmp_path, offline_cache):
    from huggingface_hub import try_to_load_from_cache

    archive = Path(shutil.make_archive(str(tmp_path / "pMF-B-16"), "zip", released["root"], "pMF-tiny"))
    put_in_cache(offline_cache, "Lyy0725/pMF", "pMF-B-16.zip", archive)
    assert Path(try_to_load_from_cache("Lyy0725/pMF", "pMF-B-16.zip", cache_dir=offline_cache)).read_bytes() == archive.read_bytes()
    model = from_pretrained("Lyy0725/pMF", filename="pMF-B-16.zip", verbose=False)
    assert_same(ours(model)[0], reference(released["ema_infer"], eval=True)[0])


def test_hub_id_missing_offline_says_what_to_fetch(offline_cache):
    with pytest.raises(HubError, match=r"pMF-L-16.zip of Lyy0725/pMF is not in the Hugging Face cache .*HF_HUB_OFFLINE is set.*"
                                              r"huggingface-cli download Lyy0725/pMF pMF-L-16.zip"):
        from_pretrained("Lyy0725/pMF", filename="pMF-L-16.zip")
    with pytest.raises(PretrainedError, match="pass filename= too"):
        load_pretrained("Lyy0725/pMF", revision="main")


# --- the PyTorch port's released .pt files (branch torch): the state dict of pixelMeanFlow(eval=True) ------------

def torch_port_state(params: dict) -> dict[str, torch.Tensor]:
    """The port's key names and layouts for the reference's params, written from a reading of the port:
    modules as in the JAX code with torch layouts, linear layers wrapped in ``_flax_linear``, the label
    table in ``embedding_table._flax_embedding``, tokens and positions (1, n, D), a complex rotary buffer."""
    net, out = params["net"], {}
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731

    def linear(prefix: str, node: dict) -> None:
        out[f"{prefix}._flax_linear.weight"] = t(node["_flax_linear"]["kernel"]).T
        if "bias" in node["_flax_linear"]:
            out[f"{prefix}._flax_linear.bias"] = t(node["_flax_linear"]["bias"])

    for conv in ("proj1", "proj2"):
        out[f"net.x_embedder.{conv}.weight"] = t(net["x_embedder"][conv]["kernel"]).permute(3, 2, 0, 1)
        out[f"net.x_embedder.{conv}.bias"] = t(net["x_embedder"][conv]["bias"])
    for name in ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder"):
        for i in (0, 2):
            linear(f"net.{name}.mlp.{i}", net[name]["mlp"][f"layers_{i}"])
    out["net.y_embedder.embedding_table._flax_embedding.weight"] = t(net["y_embedder"]["embedding_table"]["embedding"])[0]
    for name in (*official.PREFIX, "pos_embed"):
        out[f"net.{name}"] = t(net[name])
    out["net.rope_freqs"] = torch.from_numpy(np.array(official.rope_table(16, 4)))
    for group, count in (("shared_blocks", 2), ("u_heads", 2)):
        for i in range(count):
            block, prefix = net[f"{group}_{i}"], f"net.{group}.{i}"
            for norm in ("norm1", "norm2"):
                out[f"{prefix}.{norm}.weight"] = t(block[norm]["kernel"])
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{prefix}.attn.{proj}", block["attn"][proj])
            for norm in ("q_norm", "k_norm"):
                out[f"{prefix}.attn.{norm}.weight"] = t(block["attn"][norm]["kernel"])
            for w in ("w1", "w2", "w3"):
                linear(f"{prefix}.mlp.{w}", block["mlp"][w])
            out[f"{prefix}.attn_scale"], out[f"{prefix}.mlp_scale"] = t(block["attn_scale"]), t(block["mlp_scale"])
    out["net.u_final_layer.norm.weight"] = t(net["u_final_layer"]["norm"]["kernel"])
    linear("net.u_final_layer.linear", net["u_final_layer"]["linear"])
    return {k: v.contiguous() for k, v in out.items()}


def test_pytorch_port_file_gives_the_official_networks_outputs(released, tmp_path):
    torch.save(torch_port_state(released["ema_infer"]), tmp_path / "pMF-tiny.pt")
    loaded = load_pretrained(tmp_path / "pMF-tiny.pt")
    assert loaded.format == "pmf-official" and loaded.weights.startswith("the file's only weights")
    assert_same(ours(loaded.model)[0], reference(released["ema_infer"], eval=True)[0])
    from meanflow.models import load_model

    _, meta = load_model(tmp_path / "pMF-tiny.pt")  # what meanflow sample / eval read
    assert meta["data"]["kind"] == "images" and meta["data"]["sample_shape"] == [3, 16, 16] and meta["data"]["num_classes"] == 10
    with pytest.raises(PretrainedError, match="one set of weights"):
        load_pretrained(tmp_path / "pMF-tiny.pt", weights="model")


def test_hub_id_loads_the_imf_release_the_same_way(tmp_path, offline_cache):
    from test_imf_weights import official_state

    torch.save(official_state(), tmp_path / "iMF-B-2.pth")
    put_in_cache(offline_cache, "Lyy0725/iMF", "iMF-B-2.pth", tmp_path / "iMF-B-2.pth")
    loaded = load_pretrained("Lyy0725/iMF", filename="iMF-B-2.pth", input_size=8)
    direct = load_pretrained(tmp_path / "iMF-B-2.pth", input_size=8)
    assert loaded.format == "imf-official" and loaded.info["source"].endswith("iMF-B-2.pth")
    for a, b in zip(loaded.model.state_dict().values(), direct.model.state_dict().values()):
        assert torch.equal(a, b)
