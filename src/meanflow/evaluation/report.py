"""One-page health report of a run directory: ``meanflow report RUN`` -> ``RUN/report.png``.

Read from the files a run leaves (nothing is recomputed): the loss curves of ``log.jsonl``
(total, Flow Matching and MeanFlow parts, gradient norm, mean |du/dt|, skipped steps), heat
maps of the squared error by t bin and by t - r bin over training, the newest sample preview
(``samples.png`` or ``samples/step_*.png``) and the metrics of ``metrics.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

CURVES = ("loss", "mse", "mse_fm", "mse_mf")


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The records of ``run/log.jsonl`` in order (a resumed run's repeated steps keep the newest record)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run} a run directory (made by `meanflow train`)?")
    records: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path} line {number} is not JSON ({err}); the file is damaged") from err
            records[int(record["step"])] = record
    return [records[k] for k in sorted(records)]


def heat_map(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps (S,), values (S, bins)) of a per-bin log key such as ``mse_by_t``; None when not logged."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list)]
    if not rows:
        return None
    steps = np.array([s for s, _ in rows])
    values = np.array([[math.nan if v is None else v for v in row] for _, row in rows], dtype=np.float64)
    return steps, values


def newest_preview(run: str | Path) -> Path | None:
    """The most recently written sample preview of a run, if any."""
    run = Path(run)
    candidates = [p for p in [run / "samples.png", *sorted((run / "samples").glob("step_*.png"))] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def metrics_lines(run: str | Path) -> list[str]:
    """One line per evaluated sampler of ``run/metrics.json`` (empty when the run was not evaluated)."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text()).get("results", {})
    lines = []
    for name, entry in results.items():
        values = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("method", "nfe") and isinstance(v, (int, float)))
        lines.append(f"{name} ({entry.get('nfe', '?')} NFE): {values}")
    return lines


def render_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the report page of ``run`` into ``out`` (default ``run/report.png``) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from PIL import Image

    run = Path(run)
    records = read_log(run)
    if not records:
        raise ValueError(f"{run / 'log.jsonl'} holds no records yet (train.log_every steps must have passed)")
    out = Path(out) if out else run / "report.png"
    preview = newest_preview(run)
    fig = Figure(figsize=(15, 13 if preview else 8.5))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3 if preview else 2, 3, height_ratios=[1, 1, 1.2][: 3 if preview else 2])
    _curves(fig.add_subplot(grid[0, 0]), records)
    _health(fig.add_subplot(grid[0, 1]), records)
    _text(fig.add_subplot(grid[0, 2]), run, records)
    for col, (key, label) in enumerate((("mse_by_t", "t"), ("mse_by_h", "t - r (r != t rows)"))):
        _heat(fig, fig.add_subplot(grid[1, col]), heat_map(records, key), f"squared error by {label} bin", LogNorm)
    _bad_steps(fig.add_subplot(grid[1, 2]), records)
    if preview:
        ax = fig.add_subplot(grid[2, :])
        ax.imshow(np.asarray(Image.open(preview).convert("RGB")))
        ax.set_title(f"samples: {preview.relative_to(run)}", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"run {run}", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def _series(records, key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _curves(ax, records) -> None:
    for key in CURVES:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, label=key, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss (weighted) and raw squared error: all, r = t (fm), r != t (mf)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _health(ax, records) -> None:
    steps, values = _series(records, "grad_norm")
    ax.plot(steps, values, color="C0", lw=1, label="gradient norm")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm", color="C0")
    steps, values = _series(records, "dudt_abs")
    if steps:
        twin = ax.twinx()
        twin.plot(steps, values, color="C3", lw=1)
        twin.set_ylabel("mean |du/dt| (r != t rows)", color="C3")
    ax.set_title("gradient norm and mean |du/dt|", fontsize=9)
    ax.grid(alpha=0.3)


def _bad_steps(ax, records) -> None:
    steps, values = _series(records, "bad_steps")
    ax.step(steps, values, where="post", color="C3")
    ax.set_xlabel("step")
    ax.set_title(f"skipped (non-finite) steps, total {int(values[-1]) if values else 0}", fontsize=9)
    ax.grid(alpha=0.3)


def _heat(fig, ax, data, title: str, norm_cls) -> None:
    ax.set_title(title, fontsize=9)
    if data is None:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center")
        ax.axis("off")
        return
    steps, values = data
    finite = values[np.isfinite(values) & (values > 0)]
    norm = norm_cls(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    image = ax.imshow(values.T, aspect="auto", origin="lower", norm=norm, cmap="viridis", interpolation="nearest",
                      extent=(steps[0], steps[-1], 0.0, 1.0))
    ax.set_xlabel("step")
    ax.set_ylabel("bin (0 to 1)")
    fig.colorbar(image, ax=ax)


def _text(ax, run: Path, records) -> None:
    last = records[-1]
    lines = [f"step {last['step']}", *(f"{k} {last[k]:.4g}" for k in ("loss", "mse", "grad_norm", "lr", "samples_per_s")
                                       if isinstance(last.get(k), (int, float)))]
    lines += ["", "metrics.json:", *(metrics_lines(run) or ["(not evaluated)"])]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, wrap=True)
    ax.axis("off")


__all__ = ["heat_map", "metrics_lines", "newest_preview", "read_log", "render_report"]
