"""Bad input gets a clear error: a table of cases, each with the key words of its message.

Every case runs the real CLI entry point in-process and expects exit code 2 and a message on
stderr; docs/ERRORS.md lists the same table.
"""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from meanflow.cli import main
from meanflow.runtime import checkpoint as ckpt

TINY = ["model.kwargs={width: 16, depth: 1}", "data.num_samples=256", "data.holdout=64", "train.batch_size=32",
        "train.steps=2", "train.checkpoint_every=2", "eval.num_samples=64"]
POINTS = [item for item in TINY if not item.startswith("data.num_samples")]  # a points file has its own size


def _points(tmp: Path, name: str, array) -> str:
    path = tmp / name
    np.save(path, np.asarray(array, dtype=np.float64))
    return str(path)


def _trained_run(tmp: Path) -> Path:
    run = tmp / "run"
    assert main(["train", "--out", str(run), "--no-eval", *TINY]) == 0
    return run


def _case_missing_file(tmp):
    return ["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={tmp / 'nope.npy'}", *POINTS], ["nope.npy"]


def _case_empty_file(tmp):
    (tmp / "empty.csv").write_text("")
    return ["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={tmp / 'empty.csv'}", *POINTS], ["empty"]


def _case_nan_data(tmp):
    x = np.random.default_rng(0).normal(size=(300, 2))
    x[17, 1] = np.nan
    return ["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={_points(tmp, 'nan.npy', x)}", *POINTS], ["NaN"]


def _case_inf_data(tmp):
    x = np.random.default_rng(0).normal(size=(300, 2))
    x[3, 0] = np.inf
    return ["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={_points(tmp, 'inf.npy', x)}", *POINTS], ["inf"]


def _case_wrong_ndim(tmp):
    x = np.random.default_rng(0).normal(size=(300, 2, 2))
    return ["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={_points(tmp, 'cube.npy', x)}", *POINTS], ["(N, D)"]


def _case_model_dim(tmp):
    return ["train", "--out", str(tmp / "o"), *TINY, "model.kwargs.dim=3"], ["model.kwargs.dim=3", "does not fit the data"]


def _case_image_model_on_points(tmp):
    return ["train", "--out", str(tmp / "o"), *TINY, "model.name=dit-tiny/2"], ["square images"]


def _case_unknown_key(tmp):
    return ["train", "--out", str(tmp / "o"), "train.stepz=10"], ["unknown config key", "train.stepz", "did you mean", "steps"]


def _case_unknown_section(tmp):
    return ["train", "--out", str(tmp / "o"), "trian.steps=10"], ["unknown config key", "trian", "train"]


def _case_bad_choice(tmp):
    return ["train", "--out", str(tmp / "o"), "objective.kind=consistency"], ["objective.kind", "meanflow", "flow_matching"]


def _case_bad_range(tmp):
    return ["train", "--out", str(tmp / "o"), "objective.ratio=1.5"], ["objective.ratio", "[0, 1]"]


def _case_bad_type(tmp):
    return ["train", "--out", str(tmp / "o"), "train.steps=many"], ["train.steps", "integer"]


def _case_bad_batch(tmp):
    return ["train", "--out", str(tmp / "o"), "train.batch_size=0"], ["train.batch_size", "> 0"]


def _case_unknown_preset(tmp):
    return ["train", "--config", "toyy", "--out", str(tmp / "o")], ["unknown config", "toyy", "did you mean"]


def _case_unknown_model(tmp):
    return ["train", "--out", str(tmp / "o"), *TINY, "model.name=resnet"], ["model.name", "resnet", "available"]


def _case_unknown_data(tmp):
    return ["train", "--out", str(tmp / "o"), *TINY, "data.name=imagenet"], ["imagenet", "choose one of"]


def _case_unwritable_out(tmp):
    blocker = tmp / "file"
    blocker.write_text("x")
    return ["train", "--out", str(blocker / "run"), *TINY], ["not writable"]


def _case_existing_run(tmp):
    run = _trained_run(tmp)
    return ["train", "--out", str(run), *TINY], ["already holds checkpoints", "--resume"]


def _case_resume_mismatched_model(tmp):
    run = _trained_run(tmp)
    return ["train", "--resume", str(run), "model.kwargs.width=64"], ["was trained with model"]


def _case_corrupt_checkpoint(tmp):
    run = _trained_run(tmp)
    weights = ckpt.resolve_checkpoint(run) / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["sample", "--run", str(run), "--out", str(tmp / "s.npz")], ["corrupt", "ema.safetensors"]


def _case_label_out_of_range(tmp):
    run = tmp / "digits"
    assert main(["train", "--out", str(run), "--no-eval", "data.name=points", f"data.path={_labelled_points(tmp)}", *POINTS]) == 0
    return ["sample", "--run", str(run), "--class", "7", "--out", str(tmp / "s.npz")], ["class labels", "[0, 2]"]


def _case_no_checkpoint(tmp):
    (tmp / "empty_run").mkdir()
    return ["eval", "--run", str(tmp / "empty_run")], ["no complete checkpoint"]


def _case_bad_sample_suffix(tmp):
    run = _trained_run(tmp)
    return ["sample", "--run", str(run), "--out", str(tmp / "s.txt")], [".npz or .png"]


def _case_key_not_read_by_source(tmp):
    return ["train", "--out", str(tmp / "o"), *POINTS, "data.path=my.npy"], ["data.path", "checkerboard", "did you mean data.name=points"]


def _case_flip_on_points(tmp):
    return ["train", "--out", str(tmp / "o"), *TINY, "data.flip=true"], ["data.flip", "not read", "checkerboard", "digits"]


def _case_image_flag_on_point_run(tmp):
    run = _trained_run(tmp)
    return ["eval", "--run", str(run), "--fid-stats", str(tmp / "missing.npz")], ["--fid-stats", "points", "drop --fid-stats"]


def _case_resume_with_config(tmp):
    run = _trained_run(tmp)
    return ["train", "--resume", str(run), "--config", "digits"], ["--config", "--resume", "config.yaml"]


def _case_vae_on_point_run(tmp):
    run = _trained_run(tmp)
    return ["sample", "--run", str(run), "--vae", "some/vae", "--out", str(tmp / "s.npz")], ["--vae", "decodes latents", "points"]


def _case_fid_stats_flag_not_read(tmp):
    return ["fid-stats", str(tmp), "--image-size", "8", "--out", str(tmp / "s.npz")], ["--image-size", "digits", "drop"]


def _case_models_flag_not_read(tmp):
    return ["models", "--name", "mlp", "--input-size", "8"], ["--input-size", "image models", "vectors"]


def _case_batch_larger_than_data(tmp):
    return (["train", "--out", str(tmp / "o"), "data.name=points", f"data.path={_labelled_points(tmp)}", "train.steps=2",
             "train.batch_size=512"], ["batch size 512", "set train.batch_size to at most"])


def _labelled_points(tmp: Path) -> str:
    rng = np.random.default_rng(0)
    path = tmp / "labelled.npz"
    np.savez(path, x=rng.normal(size=(300, 2)), labels=rng.integers(0, 3, size=300))
    return str(path)


CASES = {name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_named(name, tmp_path, capsys):
    argv, words = CASES[name](tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word.lower() in err.lower(), f"{word!r} not in: {err}"


def test_disk_full_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import meanflow.runtime.checkpoint as C

    root = tmp_path / "checkpoints"
    C.save_checkpoint(root, 1, {"meta.json": {"step": 1}}, keep=3)
    real_write = C._write

    def full_disk(path, content):
        if path.name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, content)

    monkeypatch.setattr(C, "_write", full_disk)
    with pytest.raises(RuntimeError, match=r"No space left.*Last complete checkpoint: .*step_00000001"):
        C.save_checkpoint(root, 2, {"meta.json": {"step": 2}, "model.safetensors": {}}, keep=3)
    assert [p.name for p in root.iterdir()] == ["step_00000001"]
    assert C.latest_checkpoint(root).name == "step_00000001"


def test_partial_checkpoint_is_skipped_on_resume(tmp_path, capsys):
    run = _trained_run(tmp_path)
    fake = run / "checkpoints" / ckpt.checkpoint_name(99)
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"garbage")
    assert main(["train", "--resume", str(run), "--no-eval", "train.steps=3"]) == 0
    assert "skipping incomplete checkpoint" in capsys.readouterr().out
