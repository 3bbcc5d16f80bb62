"""`meanflow sweep`: plan, resumable execution, the summary table against the runs' own metrics."""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meanflow.config import ConfigError
from meanflow.runtime.checkpoint import save_checkpoint
from meanflow.training import sweep

TINY = {
    "model.kwargs": {"width": 16, "depth": 1}, "data.num_samples": 512, "data.holdout": 128, "train.batch_size": 32,
    "train.steps": 4, "train.log_every": 2, "train.warmup_steps": 0, "train.checkpoint_every": 2,
    "eval.num_samples": 64, "eval.baseline_ode_steps": 3,
}


def _spec(tmp_path: Path, **extra) -> Path:
    body = {"config": "toy", "overrides": TINY, "grid": {"objective.ratio": [0.0, 0.5]}, "seeds": [0, 1],
            "metrics": ["meanflow_1nfe.sliced_w2", "euler_3nfe.energy_distance"], **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meanflow", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_plan_is_variants_times_grid_times_seeds(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path, variants={"fm": {"objective.kind": "flow_matching"}, "mf": {}},
                                    grid={"objective.weight_power": [0.0], "train.lr": [1e-3, 1e-4]}))
    runs = sweep.plan(spec)
    assert len(runs) == 2 * 2 * 2
    assert [r.seed for r in runs[:2]] == [0, 1]
    assert runs[0].point == (("variant", "fm"), ("objective.weight_power", 0.0), ("train.lr", 1e-3))
    cfg = sweep.run_config(spec, runs[3], ["train.steps=7"])
    assert (cfg.objective.kind, cfg.train.lr, cfg.seed, cfg.train.steps, cfg.model.kwargs) == ("flow_matching", 1e-4, 1, 7, {"width": 16, "depth": 1})
    assert len({r.directory(tmp_path) for r in runs}) == len(runs)


def test_sweep_runs_then_skips_finished_and_resumes_interrupted(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path))
    out = tmp_path / "out"
    calls = []

    def train_fn(cfg, directory, resume):
        from meanflow.training.trainer import train

        calls.append((directory.parent.name, cfg.seed, resume))
        return train(cfg, directory, resume)

    rows = sweep.run_sweep(spec, out, train_fn=train_fn, log=lambda _: None)
    assert len(rows) == 4 and len(calls) == 4 and not any(resume for *_, resume in calls)
    finished = sweep.plan(spec)[0].directory(out) / "metrics.json"
    stamp = finished.stat().st_mtime_ns

    # an interrupted run: checkpoint at step 2 of 4, no metrics yet
    victim = sweep.plan(spec)[3].directory(out)
    (victim / "metrics.json").unlink()
    shutil.rmtree(victim / "checkpoints" / "step_00000004")
    calls.clear()
    sweep.run_sweep(spec, out, train_fn=train_fn, log=lambda _: None)
    assert calls == [(victim.parent.name, 1, True)]
    assert finished.stat().st_mtime_ns == stamp
    assert (victim / "metrics.json").exists()


@pytest.mark.heavy
def test_summary_table_matches_metrics_files(tmp_path):
    spec_path = _spec(tmp_path)
    out = tmp_path / "out"
    result = _cli("sweep", str(spec_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "finished, skipped" not in result.stdout
    again = _cli("sweep", str(spec_path), "--out", str(out))
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 4

    def raw(ratio: str, seed: int, result: str, field: str) -> float:
        return json.loads((out / f"objective.ratio={ratio}" / f"seed{seed}" / "metrics.json").read_text())["results"][result][field]

    with (out / "summary.csv").open() as handle:
        table = {(row["objective.ratio"], row["metric"]): row for row in csv.DictReader(handle)}
    for ratio in ("0.0", "0.5"):
        for metric in ("meanflow_1nfe.sliced_w2", "euler_3nfe.energy_distance"):
            values = [raw(ratio, s, *metric.split(".")) for s in (0, 1)]
            row = table[(ratio, metric)]
            assert float(row["mean"]) == pytest.approx(statistics.mean(values), rel=1e-12)
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
            assert [float(v) for v in row["values"].split(";")] == values
    text = (out / "summary.md").read_text()
    assert "| 0.5 | 0,1 |" in text and "±" in text
    assert (out / "meanflow_1nfe.sliced_w2.png").stat().st_size > 1000
    assert len((out / "runs.csv").read_text().strip().splitlines()) == 5


def test_markdown_table_shows_a_spread_only_over_two_seeds_or_more():
    def entry(values):
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")
        return {"point": {"x": 1}, "seeds": list(range(len(values))), "metrics": {"m": {"mean": mean, "std": std, "values": values}}}

    text = sweep.markdown_table([entry([0.25]), entry([0.25, 0.75])], ["m"], ["x"], "t")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert rows[0].endswith("| 0 | 0.25 [0.25] |") and "nan" not in text
    assert rows[1].endswith("| 0,1 | 0.5 ± 0.3536 [0.25, 0.75] |")


def test_markdown_table_leaves_a_metric_blank_where_no_run_reports_it():
    nan = float("nan")
    entries = [{"point": {"x": k}, "seeds": [0, 1], "metrics": {"a": {"mean": 0.5, "std": 0.1, "values": [0.4, 0.6]},
                                                              "b": {"mean": nan, "std": nan, "values": [nan, nan]}}}
               for k in (1, 2)]
    entries[1]["metrics"]["b"] = {"mean": 2.0, "std": nan, "values": [2.0, nan]}  # one seed lacks it: still shown
    text = sweep.markdown_table(entries, ["a", "b"], ["x"], "t")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0].endswith("| 0,1 | 0.5 ± 0.1 [0.4, 0.6] |  |")
    assert "nan" in rows[1]


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        sweep.load_spec(_spec(tmp_path, grids={}))
    with pytest.raises(ConfigError, match="grid axis 'objective.ratio' must be a non-empty list"):
        sweep.load_spec(_spec(tmp_path, grid={"objective.ratio": 0.5}))
    with pytest.raises(ConfigError, match="unknown sweep"):
        sweep.load_spec("no-such-sweep")
    spec, _ = sweep.load_spec(_spec(tmp_path, grid={"objective.ratoi": [0.5]}))
    with pytest.raises(ConfigError, match="did you mean objective.ratio"):
        sweep.run_sweep(spec, tmp_path / "out", log=lambda _: None)


def test_shipped_sweeps_resolve_to_valid_configs():
    assert sweep.available_sweeps(), "configs/sweeps/ ships no spec"
    for name in sweep.available_sweeps():
        spec, _ = sweep.load_spec(name)
        for run in sweep.plan(spec):
            sweep.run_config(spec, run)


def _fake_train(done: list, cfg, directory: Path, resume: bool) -> None:
    """Stands for training: records the run and leaves a final checkpoint."""
    done.append(directory)
    save_checkpoint(directory / "checkpoints", cfg.train.steps, {"meta.json": {"step": cfg.train.steps}}, keep=1)


def _fake_finish(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({"results": {"meanflow_1nfe": {"sliced_w2": 1.0}}}))


def test_shards_split_the_runs_between_processes(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path, seeds=[0, 1, 2]))
    done = []
    fake_train = functools.partial(_fake_train, done)
    out = tmp_path / "out"
    sweep.run_sweep(spec, out, train_fn=fake_train, finish_fn=_fake_finish, log=lambda _: None, shard=(1, 2))
    every = [run.directory(out) for run in sweep.plan(spec)]
    assert done == every[1::2]
    rows = sweep.run_sweep(spec, out, train_fn=fake_train, finish_fn=_fake_finish, log=lambda _: None, shard=(0, 2))
    assert sorted(done) == sorted(every) and len(rows) == len(every)
    finished = []
    sweep.run_sweep(spec, out, train_fn=fake_train, finish_fn=finished.append, log=lambda _: None, rescore=True)
    assert finished == every and sorted(done) == sorted(every), "rescoring evaluates every finished run, trains none"
    with pytest.raises(ConfigError, match="shard 2/2 does not exist"):
        sweep.run_sweep(spec, out, shard=(2, 2))


def test_a_seed_subset_trains_only_those_runs_and_shards_split_them(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path, seeds=[0, 1, 2]))
    done = []
    fake_train = functools.partial(_fake_train, done)
    out = tmp_path / "out"
    sweep.run_sweep(spec, out, train_fn=fake_train, finish_fn=_fake_finish, log=lambda _: None, seeds=[2, 0], shard=(1, 2))
    chosen = [run.directory(out) for run in sweep.plan(spec) if run.seed in (0, 2)]
    assert done == chosen[1::2] and all(d.name in ("seed0", "seed2") for d in done)
    for bad in ([3], []):
        with pytest.raises(ConfigError, match=r"must be a non-empty subset of the spec's seeds \[0, 1, 2\]"):
            sweep.run_sweep(spec, out, train_fn=fake_train, seeds=bad)


def test_an_interrupted_run_stops_the_sweep_unevaluated(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path))
    calls = []

    def interrupted(cfg, directory, resume):  # saves a checkpoint half-way, as SIGTERM does
        calls.append(resume)
        save_checkpoint(directory / "checkpoints", cfg.train.steps // 2, {"meta.json": {"step": cfg.train.steps // 2}}, keep=1)

    out = tmp_path / "out"
    rows = sweep.run_sweep(spec, out, train_fn=interrupted, finish_fn=lambda d: pytest.fail("evaluated an unfinished run"), log=lambda _: None)
    assert rows == [] and calls == [False]
    sweep.run_sweep(spec, out, train_fn=interrupted, finish_fn=lambda d: None, log=lambda _: None)
    assert calls == [False, True], "the second start resumes the interrupted run"


def test_image_runs_without_a_metric_are_refused_before_any_training(tmp_path):
    """Image data that no metric applies to (no eval.fid_stats, not digits): refused before the first run trains."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"config": "digits", "overrides": {"data.name": "folder", "data.path": str(tmp_path)},
                                    "grid": {"objective.ratio": [0.25]}, "seeds": [0], "metrics": ["meanflow_1nfe.fid"]}))
    spec, _ = sweep.load_spec(path)
    trained = []
    with pytest.raises(ConfigError, match="a sweep tabulates metrics.*eval.fid_stats"):
        sweep.run_sweep(spec, tmp_path / "out", train_fn=lambda *args: trained.append(args))
    assert not trained
    sweep.run_sweep(spec, tmp_path / "out", extra=[f"eval.fid_stats={tmp_path / 'ref.npz'}"],  # with statistics: trains
                    train_fn=lambda *args: trained.append(args), finish_fn=lambda directory: None, log=lambda message: None)
    assert len(trained) == 1


# ---- paired statistics against a baseline ------------------------------------------------------------


def test_paired_differences_by_hand():
    """diffs 0.5, 1.5, -0.25 (seed 3 has no baseline, seed 4 a NaN): mean 7/12, variance 37/48, t = 7 / sqrt(37)."""
    values = {0: 1.0, 1: 2.5, 2: 2.0, 3: 9.0, 4: float("nan")}
    paired = sweep.paired_differences(values, {0: 0.5, 1: 1.0, 2: 2.25, 4: 1.0})
    assert paired["seeds"] == [0, 1, 2] and paired["diffs"] == [0.5, 1.5, -0.25] and paired["n"] == 3
    assert paired["mean"] == pytest.approx(7 / 12, rel=1e-12) and paired["std"] == pytest.approx((37 / 48) ** 0.5, rel=1e-12)
    assert paired["same_sign"] == 2 and paired["t"] == pytest.approx(7 / 37 ** 0.5, rel=1e-12)
    worse = sweep.paired_differences({0: 1.0, 1: 1.0}, {0: 2.0, 1: 3.0})  # both below: the sign of a negative mean
    assert (worse["mean"], worse["same_sign"], worse["t"]) == (-1.5, 2, pytest.approx(-1.5 / (0.5 ** 0.5 / 2 ** 0.5)))
    assert math.isnan(sweep.paired_differences({0: 1.0}, {0: 0.0})["t"])  # one pair: no t


# sampler x ratio, seeds 0-2: metric "m.x" = 10 * (sampler is uniform) + ratio + a per-seed offset
PAIRED_VALUES = {("uniform", 0.25): [10.5, 11.0, 10.0], ("lognorm", 0.25): [0.5, 0.75, 0.5],
                 ("uniform", 0.75): [11.5, 10.5, 12.5], ("lognorm", 0.75): [1.0, 1.0, 1.0]}


def _paired_sweep(tmp_path: Path, **extra) -> tuple[Path, Path]:
    """A sampler x ratio sweep whose runs are finished (metrics.json written here, nothing trained)."""
    spec_path = _spec(tmp_path, grid={"objective.time_sampler": ["uniform", "lognorm"], "objective.ratio": [0.25, 0.75]},
                      seeds=[0, 1, 2], metrics=["m.x"], **extra)
    spec, _ = sweep.load_spec(spec_path)
    out = tmp_path / "out"
    for run in sweep.plan(spec):
        point = dict(run.point)
        value = PAIRED_VALUES[(point["objective.time_sampler"], point["objective.ratio"])][run.seed]
        run.directory(out).mkdir(parents=True)
        (run.directory(out) / "metrics.json").write_text(json.dumps({"results": {"m": {"x": value}}}))
    return spec_path, out


def test_the_summary_pairs_each_point_with_its_baseline_by_seed(tmp_path):
    """baseline {sampler: lognorm}: each uniform point against lognorm at its own ratio; the numbers by hand."""
    spec_path, out = _paired_sweep(tmp_path, baseline={"objective.time_sampler": "lognorm"})
    spec, _ = sweep.load_spec(spec_path)
    sweep.write_summary(spec, out)
    with (out / "summary.csv").open() as handle:
        table = {(row["objective.time_sampler"], row["objective.ratio"]): row for row in csv.DictReader(handle)}
    row = table[("uniform", "0.25")]  # diffs 10.0, 10.25, 9.5: mean 9.916..., std 0.3818..., 3/3 positive
    assert row["baseline"] == "objective.ratio=0.25, objective.time_sampler=lognorm"  # the spec file's axis order (sorted)
    assert [float(d) for d in row["diffs"].split(";")] == [10.0, 10.25, 9.5]
    assert float(row["diff_mean"]) == pytest.approx(29.75 / 3) and float(row["diff_std"]) == pytest.approx(statistics.stdev([10.0, 10.25, 9.5]))
    assert (row["diff_n"], row["same_sign"]) == ("3", "3")
    assert float(row["t"]) == pytest.approx((29.75 / 3) / (statistics.stdev([10.0, 10.25, 9.5]) / 3 ** 0.5))
    assert float(table[("uniform", "0.75")]["diff_mean"]) == pytest.approx(10.5)  # 11.5, 10.5, 12.5 against 1, 1, 1
    assert table[("lognorm", "0.25")]["baseline"] == table[("lognorm", "0.75")]["t"] == ""  # the baselines themselves
    text = (out / "summary.md").read_text()
    assert "## Paired differences against the baseline" in text
    assert "| 0.75 | uniform | objective.ratio=0.75, objective.time_sampler=lognorm | 0,1,2 | +10.5 ± 1, 3/3 same sign, t = 18.2 (n = 3) [+10.5, +9.5, +11.5] |" in text  # t = 10.5 sqrt(3)


def test_table_only_recomputes_the_pairs_against_a_baseline_given_on_the_command_line(tmp_path):
    """--baseline objective.ratio=0.75 (none in the spec): lognorm 0.25 against lognorm 0.75 is -0.5, -0.25, -0.5."""
    spec_path, out = _paired_sweep(tmp_path)
    result = _cli("sweep", str(spec_path), "--out", str(out), "--table-only", "--baseline", "objective.ratio=0.75")
    assert result.returncode == 0, result.stderr
    with (out / "summary.csv").open() as handle:
        table = {(row["objective.time_sampler"], row["objective.ratio"]): row for row in csv.DictReader(handle)}
    row = table[("lognorm", "0.25")]
    assert [float(d) for d in row["diffs"].split(";")] == [-0.5, -0.25, -0.5] and row["same_sign"] == "3"
    assert float(row["t"]) == pytest.approx((-1.25 / 3) / (statistics.stdev([-0.5, -0.25, -0.5]) / 3 ** 0.5))
    assert "3/3 same sign" in result.stdout


@pytest.mark.parametrize("baseline, message", [
    ({"objective.raito": 0.25}, "baseline axis 'objective.raito' is not an axis of the sweep; its axes: objective.ratio, objective.time_sampler"),
    ({"objective.ratio": 0.5}, r"baseline objective.ratio=0.5 is not one of the sweep's values 0.25, 0.75"),
    ("fm", "baseline axis 'variant' is not an axis of the sweep"),
])
def test_a_baseline_outside_the_sweep_names_the_problem(tmp_path, baseline, message):
    spec_path, _ = _paired_sweep(tmp_path)
    spec, _ = sweep.load_spec(spec_path)
    with pytest.raises(ConfigError, match=message):
        sweep.load_spec(_spec(tmp_path, grid=spec.grid, baseline=baseline))
    with pytest.raises(ConfigError, match="--baseline takes a variant name or axis=value items"):
        sweep.with_baseline(spec, ["objective.ratio=0.25", "lognorm"])


def test_a_variant_baseline_pairs_every_variant_with_it(tmp_path):
    spec, _ = sweep.load_spec(_spec(tmp_path, variants={"fm": {"objective.kind": "flow_matching"}, "mf": {}}, baseline="fm"))
    points = {run.point for run in sweep.plan(spec)}
    axes = sweep.baseline_axes(spec)
    assert axes == {"variant": "fm"}
    assert {p: sweep.baseline_point(p, axes) for p in points} == {
        (("variant", "fm"), ("objective.ratio", 0.0)): None, (("variant", "fm"), ("objective.ratio", 0.5)): None,
        (("variant", "mf"), ("objective.ratio", 0.0)): (("variant", "fm"), ("objective.ratio", 0.0)),
        (("variant", "mf"), ("objective.ratio", 0.5)): (("variant", "fm"), ("objective.ratio", 0.5))}
