"""Class-conditional sliced W2 (labelled point clouds), against exact 1-D Wasserstein distances."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meanflow.metrics.pointcloud import class_sliced_wasserstein, sliced_wasserstein


def exact_w2_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W2 between two 1-D empirical measures of equal size: root mean square of sorted differences."""
    return float(np.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2)))


def test_each_class_counts_once_whatever_its_size():
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(0, 1, 10), rng.normal(5, 1, 30)])[:, None]
    labels = np.array([0] * 10 + [1] * 30)
    x = y + np.where(labels == 0, 1.0, 3.0)[:, None]  # class 0 shifted by 1, class 1 by 3
    # in 1-D sliced W2 is the exact W2, here the shift; classes weigh equally: (1 + 3) / 2, not (10 + 90) / 40
    assert class_sliced_wasserstein(x, labels, y, labels, num_projections=4) == pytest.approx(2.0, rel=1e-12)


def test_sees_samples_on_the_wrong_class():
    rng = np.random.default_rng(1)
    a, b = rng.normal(-2, 0.5, 50), rng.normal(2, 0.5, 50)
    y = np.concatenate([a, b])[:, None]
    y_labels = np.array([0] * 50 + [1] * 50)
    swapped = 1 - y_labels  # the same points, each labelled as the other class
    assert sliced_wasserstein(y, y) == 0.0
    assert class_sliced_wasserstein(y, y_labels, y, y_labels) == 0.0
    expected = exact_w2_1d(b, a)  # class 0 samples are b, class 1 samples are a: both terms equal W2(a, b)
    assert class_sliced_wasserstein(y, swapped, y, y_labels, num_projections=2) == pytest.approx(expected, rel=1e-12)


def test_unequal_sample_counts_per_class():
    y = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    y_labels = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[0.5], [10.0], [10.0], [11.0], [11.0]])
    x_labels = torch.tensor([0, 1, 1, 1, 1])
    # class 0: W2 between {0.5} and {0, 1} is 0.5; class 1: {10, 10, 11, 11} against {10, 11} is 0
    assert class_sliced_wasserstein(x, x_labels, y, y_labels, num_projections=1) == pytest.approx(0.25, rel=1e-12)


def test_bad_labels_are_named():
    y, labels = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="class 1 has reference points but no samples"):
        class_sliced_wasserstein(y, torch.zeros(4, dtype=torch.long), y, labels)
    with pytest.raises(ValueError, match=r"x_labels must have shape \(4,\)"):
        class_sliced_wasserstein(y, labels[:3], y, labels)
