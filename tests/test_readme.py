"""The README's Python examples run as written and do what the README says they do."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from meanflow.data.toy import sample_toy
from meanflow.metrics.pointcloud import sliced_wasserstein
from test_imf_weights import official_state

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    """The ```python blocks of the README, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_two_api_examples():
    blocks = python_blocks()
    assert len(blocks) == 2 and "MeanFlowLoss" in blocks[0] and "from_pretrained" in blocks[1]


def run_training_example(steps: int | None = None) -> dict:
    """Block 1 run in a fresh namespace (with ``steps`` training steps instead of the written 2000)."""
    code = python_blocks()[0]
    if steps is not None:
        assert "range(2000)" in code
        code = code.replace("range(2000)", f"range({steps})")
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_training_example_runs():
    """Block 1 with 20 steps (the API calls as written): samples of the right shape from both samplers."""
    scope = run_training_example(steps=20)
    assert scope["x1"].shape == scope["x100"].shape == (1000, 2)
    assert torch.isfinite(scope["x1"]).all() and torch.isfinite(scope["x100"]).all() and set(scope["stats"]) >= {"loss", "mse"}


@pytest.mark.slow
def test_training_example_gives_a_one_step_sampler():
    """Block 1 as written (about 40 s): its 1-NFE samples are far closer to moons than the noise they start from."""
    scope = run_training_example()
    reference = sample_toy("moons", 1000, torch.Generator().manual_seed(10**6))

    def distance(x: torch.Tensor) -> float:
        return float(sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(0)))

    noise = distance(torch.randn(1000, 2))
    assert distance(scope["x1"]) < noise / 2 and distance(scope["x100"]) < noise / 2


def test_released_weights_example(tmp_path, monkeypatch):
    """Block 2 on a file in the official iMF layout (random weights of a small size): loads, samples 8 classes."""
    torch.save(official_state(hidden=32, heads=2, classes=1000), tmp_path / "iMF-B-2.pth")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"torch": torch}
    exec(compile("import meanflow\n" + python_blocks()[1], "README.md", "exec"), scope)
    assert not scope["model"].training
    assert scope["x"].shape == (8, 4, 32, 32) and torch.isfinite(scope["x"]).all()
