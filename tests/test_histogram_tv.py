"""Histogram total variation between 2-D point clouds, against hand-counted cases."""
from __future__ import annotations

import pytest
import torch

from meanflow.metrics.pointcloud import histogram_tv


def test_identical_disjoint_and_hand_counted_cases():
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(5, 1)  # two cells of a 2 x 2 grid, half the mass each
    assert histogram_tv(y, y, bins=2) == 0.0
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert histogram_tv(x, y, bins=2) == pytest.approx(0.25)  # |0.75 - 0.5| + |0.25 - 0.5|, halved
    outside = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    assert histogram_tv(outside, y, bins=2) == pytest.approx(0.5)  # the far point is mass where y has none
    assert histogram_tv(y + 10.0, y, bins=2) == 1.0


def test_rejects_other_dimensions_and_bins():
    with pytest.raises(ValueError, match="2-D points"):
        histogram_tv(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="bins"):
        histogram_tv(torch.zeros(4, 2), torch.ones(4, 2), bins=0)
