"""The benchmark scripts that docs/BENCHMARKS.md quotes still run (tiny settings; no timing is checked)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("args, expected", [
    (["benchmarks/profile_rows.py", "--fixed", "--batch", "4", "--repeats", "1"], ["row pass, 1 tangent row", "bare mode"]),
    (["benchmarks/profile_rows.py", "--batch", "4", "--rows", "2", "--repeats", "1", "--top", "3"], ["row pass (2 of 4 rows)"]),
    (["benchmarks/bench_dropout.py", "--size", "8", "--channels", "1", "--repeats", "1"], ["per-sample masks", "F.dropout"]),
    (["benchmarks/bench_step.py", "--device", "cpu", "--preset", "plain", "--models", "plain-dit", "--batch", "4",
      "--warmup", "0", "--repeats", "1", "--variants", "mf25"], ["mf25", "du/dt vs torch.func.jvp"]),
])
@pytest.mark.heavy
def test_benchmark_script_runs(args, expected):
    out = run_script(*args)
    for text in expected:
        assert text in out, out[-2000:]


@pytest.mark.heavy
def test_gpu_session_script_runs_each_step_under_its_limit(tmp_path):
    """Without CUDA every step fails fast, but the script runs them all and keeps each step's output."""
    if __import__("torch").cuda.is_available():
        pytest.skip("on a GPU machine this would run the real session")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "scripts/gpu_session.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("== ") == 3 and done.stdout.count("exit 2") == 3, done.stdout
    assert "CUDA is not available" in (tmp_path / "rows_compile.txt").read_text()
    assert (tmp_path / "device.txt").exists()
