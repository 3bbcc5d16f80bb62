"""Previews: 1 NFE, 2 NFE and the ODE side by side, from the same noise."""
from __future__ import annotations

import torch
from PIL import Image

from meanflow.data.base import TensorDataset
from meanflow.evaluation.preview import caption, point_panels, preview_plan, save_preview
from meanflow.runtime.seeding import step_generator


class ConstantVelocity(torch.nn.Module):
    """u(z, r, t) = c: every sampler maps noise e to e - c exactly (the path is a straight line)."""

    num_classes = 0

    def __init__(self, c):
        super().__init__()
        self.c = torch.tensor(c)

    def forward(self, z, r, t, labels=None):
        return self.c.expand_as(z)


def _points(n=300):
    return TensorDataset(torch.randn(n, 2, generator=torch.Generator().manual_seed(3)) + 5, kind="points")


def test_point_panels_are_data_then_each_sampler_from_the_same_noise():
    data, model = _points(), ConstantVelocity([1.0, -2.0])
    panels = point_panels(model, data, seed=7, num=200)
    assert [name for name, _ in panels] == ["data (n=200)", "1 NFE (MeanFlow)", "2 NFE (MeanFlow)", "100 NFE (Euler ODE)"]
    assert torch.equal(panels[0][1], data.get(torch.arange(200))[0])
    noise = torch.randn((200, 2), generator=step_generator(7, 0, "sample"))
    for _, samples in panels[1:]:
        torch.testing.assert_close(samples, noise - model.c, atol=1e-5, rtol=0)


def test_flow_matching_preview_uses_euler_steps_and_png_has_a_panel_per_sampler(tmp_path):
    assert preview_plan("flow_matching", 50) == (("euler", 1), ("euler", 2), ("euler", 50))
    assert caption("heun", 3) == "5 NFE (Heun ODE)"
    narrow = save_preview(ConstantVelocity([0.0, 0.0]), _points(), tmp_path / "a.png", num=50, plan=(("meanflow", 1),))
    wide = save_preview(ConstantVelocity([0.0, 0.0]), _points(), tmp_path / "b.png", num=50)
    assert Image.open(wide).size[0] >= 2 * Image.open(narrow).size[0]
