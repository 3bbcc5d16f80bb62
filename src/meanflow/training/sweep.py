"""Sweeps: a grid of config overrides x seeds, trained one after another, then one table.

A sweep spec is a YAML file (``configs/sweeps/NAME.yaml`` ships with the package)::

    config: toy                          # base preset or YAML file (relative to the spec)
    overrides: {train.steps: 800}        # applied to every run
    grid:                                # the product of these axes is run...
      objective.ratio: [0.0, 0.25, 0.5]
    variants:                            # ...times these named override sets (optional)
      flow_matching: {objective.kind: flow_matching}
    seeds: [0, 1, 2]                     # ...times these seeds
    metrics: [meanflow_1nfe.sliced_w2]   # "<result>.<field>" of metrics.json (default: all)
    baseline: {objective.ratio: 0.0}     # optional: compare every point with this one, paired by seed

Run ``i`` lives in ``OUT/<point>/seed<s>/`` (a normal run directory). A run whose
``metrics.json`` exists is finished and skipped; one with checkpoints but no metrics is resumed;
so an interrupted sweep continues where it stopped when started again. The summary
(``summary.md``, ``summary.csv``, ``runs.csv`` and one ``<metric>.png`` per metric) holds, per grid
point, the mean and standard deviation over seeds and the raw values.

``baseline`` names the point each other point is compared with: a mapping of axes to values
(``variant`` for a variant's name), or a variant's name alone. Axes it leaves out stay those of
the point, so ``{objective.time_sampler: lognorm}`` in a sampler x ratio grid compares each
sampler with lognorm at the same ratio. Per metric the summary then adds the paired statistics
of :func:`paired_differences`: the per-seed differences (point minus baseline, seeds both have),
their mean and sample standard deviation, how many seeds agree in sign with the mean, and the
paired t statistic with its n (``meanflow sweep --baseline`` replaces the spec's).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..config import CONFIG_DIR, Config, ConfigError, load_config
from ..evaluation import evaluate_run
from ..evaluation.run import check_scored
from ..runtime.checkpoint import latest_checkpoint, read_meta
from ..runtime.distributed import DistInfo
from .trainer import train

SWEEP_DIR = CONFIG_DIR / "sweeps"
PAIRED_COLUMNS = ("baseline", "diffs", "diff_mean", "diff_std", "diff_n", "same_sign", "t")  # summary.csv, with a baseline
SPEC_KEYS = ("config", "overrides", "grid", "variants", "seeds", "metrics", "description", "baseline")


@dataclass
class SweepSpec:
    """A parsed sweep spec (see the module docstring)."""

    config: str = "toy"
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    metrics: list[str] = field(default_factory=list)
    description: str = ""
    baseline: dict[str, Any] | str | None = None


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a grid point (ordered (axis, value) pairs) and a seed."""

    point: tuple[tuple[str, Any], ...]
    seed: int
    settings: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        """Human-readable grid point, e.g. ``objective.ratio=0.25``."""
        return ", ".join(f"{k}={_text(v)}" for k, v in self.point) or "base"

    def directory(self, out: Path) -> Path:
        return out / _slug(self.point) / f"seed{self.seed}"


def available_sweeps() -> list[str]:
    """Names of the sweep specs shipped with the package."""
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> tuple[SweepSpec, Path]:
    """Parse a sweep spec (a shipped name or a YAML path); returns it and the file it came from."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEP_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown sweep {str(name_or_path)!r}; shipped sweeps: {', '.join(available_sweeps())} (or give a YAML path)")
    if not path.is_file():
        raise ConfigError(f"sweep spec {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep spec {str(path)!r} must be a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"sweep spec {str(path)!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}")
    spec = SweepSpec(**raw)
    _check_spec(spec, path)
    config = Path(spec.config)
    if config.suffix and not config.is_absolute():
        spec.config = str(path.parent / config)
    return spec, path


def _check_spec(spec: SweepSpec, path: Path) -> None:
    where = f"sweep spec {str(path)!r}"
    for name in ("overrides", "grid", "variants"):
        if not isinstance(getattr(spec, name), dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {getattr(spec, name)!r}")
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid axis {key!r} must be a non-empty list of values, got {values!r}")
    for name, settings in spec.variants.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: variant {name!r} must be a mapping of key: value overrides, got {settings!r}")
    if not isinstance(spec.seeds, list) or not spec.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in spec.seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {spec.seeds!r}")
    if not isinstance(spec.metrics, list) or not all(isinstance(m, str) and "." in m for m in spec.metrics):
        raise ConfigError(f"{where}: metrics must be a list of '<result>.<field>' names such as 'meanflow_1nfe.sliced_w2', got {spec.metrics!r}")
    baseline_axes(spec, where)


def baseline_axes(spec: SweepSpec, where: str = "sweep spec") -> dict[str, Any]:
    """The spec's baseline as {axis: value} (a variant name becomes {"variant": name}; none: {}), checked
    against the spec's axes and their values; ConfigError naming the fix otherwise."""
    baseline = spec.baseline
    if baseline is None:
        return {}
    if isinstance(baseline, str):
        baseline = {"variant": baseline}
    if not isinstance(baseline, dict) or not baseline:
        raise ConfigError(f"{where}: baseline must be a variant name or a mapping of axes to values, e.g. "
                          f"{{objective.ratio: 0.25}}; got {spec.baseline!r}")
    values = {"variant": list(spec.variants), **spec.grid}
    for axis, value in baseline.items():
        if axis not in values or not values[axis]:
            raise ConfigError(f"{where}: baseline axis {axis!r} is not an axis of the sweep; its axes: {', '.join(_axes(spec)) or 'none'}")
        if value not in values[axis]:
            raise ConfigError(f"{where}: baseline {axis}={_text(value)} is not one of the sweep's values "
                              f"{', '.join(map(_text, values[axis]))}")
    return baseline


def with_baseline(spec: SweepSpec, items: list[str]) -> SweepSpec:
    """``spec`` with the baseline given on the command line: a variant name, or ``axis=value`` items (YAML values)."""
    if len(items) == 1 and "=" not in items[0]:
        baseline: dict[str, Any] | str = items[0]
    else:
        pairs = [item.partition("=") for item in items]
        if not all(sep for _, sep, _ in pairs):
            raise ConfigError(f"--baseline takes a variant name or axis=value items, e.g. --baseline objective.ratio=0.25; got {items!r}")
        baseline = {key: yaml.safe_load(text) for key, _, text in pairs}
    replaced = dataclasses.replace(spec, baseline=baseline)
    baseline_axes(replaced, "--baseline")
    return replaced


def baseline_point(point: tuple[tuple[str, Any], ...], baseline: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """The point ``point`` is compared with: its axes with the baseline's values; None without a baseline or
    for a baseline point itself."""
    if not baseline:
        return None
    other = tuple((axis, baseline.get(axis, value)) for axis, value in point)
    return None if other == point else other


def plan(spec: SweepSpec) -> list[SweepRun]:
    """All runs in order: variants x grid product (first axis slowest) x seeds."""
    variants = list(spec.variants.items()) or [(None, {})]
    axes = list(spec.grid.items())
    runs = []
    for name, extra in variants:
        for values in itertools.product(*(v for _, v in axes)):
            point = ((("variant", name),) if name is not None else ()) + tuple((k, v) for (k, _), v in zip(axes, values))
            settings = tuple({**spec.overrides, **extra, **{k: v for (k, _), v in zip(axes, values)}}.items())
            runs.extend(SweepRun(point, seed, settings) for seed in spec.seeds)
    return runs


def run_config(spec: SweepSpec, run: SweepRun, extra: list[str] = ()) -> Config:
    """The validated config of one run: base config, spec overrides, grid point, seed, then ``extra``."""
    items = [f"{key}={json.dumps(value)}" for key, value in run.settings] + [f"seed={run.seed}", *extra]
    return load_config(spec.config, items)


def run_sweep(
    spec: SweepSpec, out: str | Path, extra: list[str] = (), train_fn: Callable | None = None,
    finish_fn: Callable | None = None, log: Callable[[str], None] = print, shard: tuple[int, int] = (0, 1),
    rescore: bool = False, seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished run of ``spec`` under ``out``; return :func:`collect`'s rows.

    ``extra``: ``key=value`` overrides applied to every run after the spec's own (e.g. fewer steps).
    ``shard=(i, n)``: only runs number i, i + n, i + 2n, ... (n processes, each with its own i,
    share a sweep without touching each other's runs). ``rescore``: evaluate finished runs again
    (after the evaluation changed) instead of skipping them. ``seeds``: train only the runs of these
    of the spec's seeds (for example every grid point's first seed before the others; the shards
    count the selected runs). ``train_fn(cfg, out, resume)`` and
    ``finish_fn(run_dir)`` default to the trainer and to an evaluation writing ``metrics.json``.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} does not exist: use i/n with 0 <= i < n")
    train_fn = train_fn or train
    finish_fn = finish_fn or write_metrics
    out = Path(out)
    if seeds is not None and (not seeds or set(seeds) - set(spec.seeds)):
        raise ConfigError(f"seeds {seeds} must be a non-empty subset of the spec's seeds {spec.seeds}")
    runs = [run for run in plan(spec) if seeds is None or run.seed in seeds]
    configs = [run_config(spec, run, extra) for run in runs]  # validate every run before training any
    for cfg in configs:
        check_scored(cfg)
    for i, (run, cfg) in enumerate(zip(runs, configs)):
        if i % count != index:
            continue
        directory = run.directory(out)
        if _finished(directory):
            log(f"[{i + 1}/{len(runs)}] {run.label} seed {run.seed}: finished, {'evaluated again' if rescore else 'skipped'}")
            if rescore:
                finish_fn(directory)
            continue
        resume = latest_checkpoint(directory / "checkpoints") is not None
        log(f"[{i + 1}/{len(runs)}] {run.label} seed {run.seed}: {'resuming' if resume else 'training'} in {directory}")
        if not (resume and _trained(directory, cfg)):
            train_fn(cfg, directory, resume)
            if not _trained(directory, cfg):
                log(f"stopped before {run.label} seed {run.seed} reached step {cfg.train.steps}; run the same command to continue")
                break
        finish_fn(directory)
    return collect(spec, out)


def write_metrics(run_dir: Path) -> dict[str, Any]:
    """Evaluate a finished run (EMA weights, its config's eval section) into ``run_dir/metrics.json``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_run(run_dir, info=DistInfo(device=device), preview=run_dir / "samples.png")
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run_dir / "metrics.json")
    return metrics


def _finished(directory: Path) -> bool:
    try:
        return isinstance(json.loads((directory / "metrics.json").read_text()).get("results"), dict)
    except (OSError, ValueError):
        return False


def _trained(directory: Path, cfg: Config) -> bool:
    last = latest_checkpoint(directory / "checkpoints")
    return last is not None and read_meta(last).get("step") == cfg.train.steps


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"meanflow_1nfe": {"sliced_w2": 0.1, ...}}`` -> ``{"meanflow_1nfe.sliced_w2": 0.1, ...}`` (numbers only, no NFE)."""
    flat = {}
    for name, entry in results.items():
        for key, value in entry.items():
            if key != "nfe" and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{name}.{key}"] = float(value)
    return flat


def collect(spec: SweepSpec, out: str | Path) -> list[dict[str, Any]]:
    """One row per finished run: ``{"run", "point", "label", "seed", "metrics"}``; unfinished runs are left out."""
    rows = []
    for run in plan(spec):
        directory = run.directory(Path(out))
        if _finished(directory):
            results = json.loads((directory / "metrics.json").read_text())["results"]
            rows.append({"run": run, "point": run.point, "label": run.label, "seed": run.seed, "metrics": flatten_metrics(results)})
    return rows


def metric_names(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """The spec's metrics, or every metric of the finished runs (data floor last) when it names none."""
    if spec.metrics:
        return list(spec.metrics)
    names = sorted({m for row in rows for m in row["metrics"]}, key=lambda m: (m.startswith("data_floor"), m))
    return names


def summarise(rows: list[dict[str, Any]], metrics: list[str], baseline: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per grid point (in plan order) and metric: mean, sample standard deviation, count, raw values by seed.

    With ``baseline`` ({axis: value}, see :func:`baseline_axes`) every point with finished baseline runs
    gets ``"baseline"`` (the baseline point's label) and, per metric, ``"paired"``: :func:`paired_differences`
    of its values against the baseline's, by seed.
    """
    points: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault(row["point"], []).append(row)
    summary = []
    for point, group in points.items():
        entry = {"point": point, "label": group[0]["label"], "seeds": [r["seed"] for r in group], "metrics": {}}
        other = points.get(baseline_point(point, baseline or {}))
        if other:
            entry["baseline"] = other[0]["label"]
        for name in metrics:
            values = [r["metrics"].get(name, math.nan) for r in group]
            entry["metrics"][name] = {"mean": _mean(values), "std": _std(values), "n": len(values), "values": values}
            if other:
                entry["metrics"][name]["paired"] = paired_differences(_by_seed(group, name), _by_seed(other, name))
        summary.append(entry)
    return summary


def _by_seed(rows: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """{seed: value of ``metric``} of a point's finished runs (NaN where a run does not report it)."""
    return {r["seed"]: r["metrics"].get(metric, math.nan) for r in rows}


def paired_differences(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Paired comparison of ``values`` against ``baseline`` (each {seed: value}) over the seeds both have (finite).

    Returns ``seeds`` and ``diffs`` (value minus baseline, by seed), ``mean`` and ``std`` (sample, n - 1) of the
    differences, ``n``, ``same_sign`` (how many differences have the sign of the mean; zeros do not) and ``t``,
    the paired t statistic mean / (std / sqrt(n)) with n - 1 degrees of freedom (NaN for n < 2; +-inf when
    every difference is the same nonzero number).
    """
    seeds = sorted(s for s in values if s in baseline and math.isfinite(values[s]) and math.isfinite(baseline[s]))
    diffs = [values[s] - baseline[s] for s in seeds]
    mean, std, n = _mean(diffs), _std(diffs), len(diffs)
    sign = math.copysign(1.0, mean) if n and mean else 0.0
    same = sum(1 for d in diffs if d * sign > 0)
    if n < 2:
        t = math.nan
    elif std > 0:
        t = mean / (std / math.sqrt(n))
    else:
        t = math.copysign(math.inf, mean) if mean else math.nan
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "n": n, "same_sign": same, "t": t}


def write_summary(spec: SweepSpec, out: str | Path, title: str = "sweep") -> dict[str, Path]:
    """Write summary.md, summary.csv, runs.csv and one PNG per metric under ``out``; returns their paths."""
    out = Path(out)
    rows = collect(spec, out)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {out}: run the sweep first")
    metrics = metric_names(spec, rows)
    summary = summarise(rows, metrics, baseline_axes(spec))
    axes = _axes(spec)
    paths = {"markdown": out / "summary.md", "csv": out / "summary.csv", "runs": out / "runs.csv"}
    paths["markdown"].write_text(markdown_table(summary, metrics, axes, title, total=len(plan(spec))))
    _write_summary_csv(paths["csv"], summary, metrics, axes)
    _write_runs_csv(paths["runs"], rows, metrics, axes)
    for name in metrics:
        paths[name] = plot_metric(summary, name, out / f"{_file_name(name)}.png", title)
    return paths


def markdown_table(summary: list[dict[str, Any]], metrics: list[str], axes: list[str], title: str, total: int | None = None) -> str:
    """Markdown: one row per grid point, each metric as ``mean ± std`` over seeds with the raw values below."""
    done = sum(len(e["seeds"]) for e in summary)
    lines = [f"# {title}", "", f"{done} finished runs" + (f" of {total}" if total else "") + "; mean ± standard deviation over seeds "
             "(sample std, n - 1; none with one seed), raw values by seed in brackets.", ""]
    lines.append("| " + " | ".join([*axes, "seeds", *metrics]) + " |")
    lines.append("|" + "---|" * len(axes) + "---|" + "---:|" * len(metrics))
    for entry in summary:
        point = dict(entry["point"])
        cells = [_text(point.get(a, "")) for a in axes] + [",".join(map(str, entry["seeds"]))]
        for name in metrics:
            m = entry["metrics"][name]
            if all(math.isnan(v) for v in m["values"]):
                cells.append("")  # no run of this point reports the metric (Flow Matching has no MeanFlow sampler)
                continue
            raw = ", ".join(_fmt(v) for v in m["values"])
            spread = "" if len(m["values"]) < 2 else f" ± {_fmt(m['std'])}"  # one seed: no spread to show
            cells.append(f"{_fmt(m['mean'])}{spread} [{raw}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _paired_lines(summary, metrics, axes)) + "\n"


def _paired_lines(summary: list[dict[str, Any]], metrics: list[str], axes: list[str]) -> list[str]:
    """The markdown section of paired differences (none when no point has a baseline)."""
    compared = [entry for entry in summary if "baseline" in entry]
    if not compared:
        return []
    lines = ["", "## Paired differences against the baseline", "",
             "Point minus baseline, paired by seed (the seeds both have): mean ± std of the differences (n - 1), "
             "seeds whose difference has the mean's sign, paired t = mean / (std / sqrt(n)) with n - 1 degrees of "
             "freedom, and the differences by seed in brackets.", ""]
    lines.append("| " + " | ".join([*axes, "baseline", "seeds", *metrics]) + " |")
    lines.append("|" + "---|" * (len(axes) + 2) + "---:|" * len(metrics))
    for entry in compared:
        point = dict(entry["point"])
        paired = [entry["metrics"][name]["paired"] for name in metrics]
        seeds = max((p["seeds"] for p in paired), key=len)
        cells = [_text(point.get(a, "")) for a in axes] + [entry["baseline"], ",".join(map(str, seeds))]
        cells += [_paired_cell(p) for p in paired]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_cell(p: dict[str, Any]) -> str:
    """``+0.012 ± 0.004, 3/3 same sign, t = 5.2 (n = 3) [+0.01, +0.015, +0.011]``; blank without pairs."""
    if not p["n"]:
        return ""
    spread = "" if p["n"] < 2 else f" ± {_fmt(p['std'])}"
    t = "" if math.isnan(p["t"]) else f", t = {p['t']:.3g}"
    raw = ", ".join(f"{d:+.4g}" for d in p["diffs"])
    return f"{p['mean']:+.4g}{spread}, {p['same_sign']}/{p['n']} same sign{t} (n = {p['n']}) [{raw}]"


def plot_metric(summary: list[dict[str, Any]], name: str, path: Path, title: str = "") -> Path:
    """PNG: one column per grid point, mean ± std as an error bar and the seeds' values as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.1 * len(summary) + 1.5), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, entry in enumerate(summary):
        m = entry["metrics"][name]
        ax.errorbar([i], [m["mean"]], yerr=[0.0 if math.isnan(m["std"]) else m["std"]], fmt="o", color="C0", capsize=4, markersize=7)
        ax.scatter([i] * len(m["values"]), m["values"], color="C1", s=12, zorder=3)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([e["label"].replace(", ", "\n") for e in summary], fontsize=7)
    ax.set_ylabel(name)
    ax.set_title(f"{title}: mean ± std (blue), seeds (orange)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _axes(spec: SweepSpec) -> list[str]:
    return (["variant"] if spec.variants else []) + list(spec.grid)


def _write_summary_csv(path: Path, summary, metrics: list[str], axes: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*axes, "metric", "mean", "std", "n", "values", *PAIRED_COLUMNS])
        for entry in summary:
            point = dict(entry["point"])
            for name in metrics:
                m = entry["metrics"][name]
                p = m.get("paired")
                paired = ["", "", "", "", "", "", ""] if p is None else [
                    entry["baseline"], ";".join(map(repr, p["diffs"])), p["mean"], p["std"], p["n"], p["same_sign"], p["t"]]
                writer.writerow([*(_text(point.get(a, "")) for a in axes), name, m["mean"], m["std"], m["n"],
                                 ";".join(map(repr, m["values"])), *paired])


def _write_runs_csv(path: Path, rows, metrics: list[str], axes: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*axes, "seed", *metrics])
        for row in rows:
            point = dict(row["point"])
            writer.writerow([*(_text(point.get(a, "")) for a in axes), row["seed"], *(row["metrics"].get(m, math.nan) for m in metrics)])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); NaN for fewer than two values."""
    if len(values) < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _slug(point: tuple[tuple[str, Any], ...]) -> str:
    """A file-name-safe directory name for a grid point (hashed when long)."""
    if not point:
        return "base"
    text = "__".join(f"{k}={_text(v)}" for k, v in point)
    safe = re.sub(r"[^A-Za-z0-9._=,-]+", "-", text)
    if len(safe) > 120:
        safe = safe[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:12]
    return safe


def _file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", metric)


__all__ = ["SweepRun", "SweepSpec", "available_sweeps", "baseline_axes", "baseline_point", "collect", "flatten_metrics", "load_spec",
           "markdown_table", "paired_differences", "plan", "plot_metric", "run_config", "run_sweep", "summarise", "with_baseline",
           "write_metrics", "write_summary"]
