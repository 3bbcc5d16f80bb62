"""Run logs: a JSON-lines file, TensorBoard scalars (when installed) and a progress bar (rank 0)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Writes ``log.jsonl`` and TensorBoard events under the run directory; silent on other ranks."""

    def __init__(self, out: Path, start: int, total: int, enabled: bool, batch_size: int):
        self.enabled = enabled
        self.batch_size = batch_size
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
        self.file = open(out / "log.jsonl", "a") if enabled else None
        self.tb = _tensorboard(out / "tb") if enabled else None
        self._t0, self._s0 = time.perf_counter(), start

    def step(self, step: int, stats: dict[str, float], log: bool) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if not log:
            return
        now = time.perf_counter()
        rate = (step + 1 - self._s0) / max(now - self._t0, 1e-9)
        self._t0, self._s0 = now, step + 1
        stats = {**stats, "steps_per_s": rate, "samples_per_s": rate * self.batch_size}
        self.bar.set_postfix(loss=f"{stats['loss']:.4g}", mse=f"{stats['mse']:.4g}", samples_s=f"{stats['samples_per_s']:.0f}")
        self.file.write(json.dumps({"step": step + 1, **{k: _clean(v) for k, v in stats.items()}}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in stats.items():
                if isinstance(value, list):  # per-bin diagnostics: one curve per bin
                    for i, item in enumerate(value):
                        self._scalar(f"bins/{key}/{i}", item, step + 1)
                else:
                    self._scalar(f"train/{key}", value, step + 1)

    def _scalar(self, tag: str, value, step: int) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.tb.add_scalar(tag, value, step)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _clean(value):
    """JSON-safe: non-finite floats (also inside per-bin lists) become null."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
