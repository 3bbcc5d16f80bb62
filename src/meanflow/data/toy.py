"""Built-in 2-D toy distributions.

Every sampler draws from the given ``torch.Generator`` only (CPU), so the same generator state gives
the same points. All distributions are scaled to roughly the scale of the noise N(0, I): coordinates
lie within [-4, 4] and the per-coordinate standard deviation is between about 1 and 2.

=============  ===============================================================================
name           distribution
=============  ===============================================================================
checkerboard   uniform on the 8 dark cells of a 4 x 4 checkerboard covering [-2, 2]^2
8gaussians     8 Gaussians (std 0.25) centred on a circle of radius 2
moons          two interleaved half circles (as ``sklearn.datasets.make_moons``), noise 0.1
spirals        two interleaved spirals (each the point reflection of the other), noise 0.1
rings          three concentric circles of radius 1, 2, 3 (uniform along their length), noise 0.08
swissroll      the 2-D swiss roll t (cos t, sin t), t in [1.5 pi, 4.5 pi], scaled into [-3, 3]
=============  ===============================================================================
"""
from __future__ import annotations

import math
from typing import Callable

import torch

TOY_DATASETS = ("checkerboard", "8gaussians", "moons", "spirals", "rings", "swissroll")


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` points of the toy distribution ``name``; returns (n, 2) float32 on the CPU."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    if n < 1:
        raise ValueError(f"number of toy samples must be >= 1, got {n}")
    return _SAMPLERS[name](n, generator).float()


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 uniform on [0, 1)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    # a cell (i, j) of the 4 x 4 board is dark when i + j is even; pick a column, then a dark row in it.
    col = torch.randint(0, 4, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return torch.stack([col, row], dim=1).double() + offset - 2.0


def _eight_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    angle = torch.randint(0, 8, (n,), generator=generator).double() * (math.pi / 4)
    centres = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.25 * _normal((n, 2), generator)


def _moons(n: int, generator: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=generator) < 0.5
    angle = math.pi * _uniform(n, generator)
    top = torch.stack([angle.cos(), angle.sin()], dim=1)
    bottom = torch.stack([1.0 - angle.cos(), 0.5 - angle.sin()], dim=1)
    points = torch.where(upper[:, None], top, bottom) + 0.1 * _normal((n, 2), generator)
    return 2.0 * (points - torch.tensor([0.5, 0.25], dtype=torch.float64))


def _spirals(n: int, generator: torch.Generator) -> torch.Tensor:
    # sqrt makes the density uniform along the arm; the second arm is the first rotated by pi.
    turn = 3 * math.pi * _uniform(n, generator).sqrt()
    arm = torch.stack([-turn.cos() * turn, turn.sin() * turn], dim=1) / math.pi
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0).double()
    return sign[:, None] * arm + 0.1 * _normal((n, 2), generator)


def _rings(n: int, generator: torch.Generator) -> torch.Tensor:
    # ring k has radius k and is chosen with probability proportional to its length.
    radius = torch.multinomial(torch.tensor([1.0, 2.0, 3.0]), n, replacement=True, generator=generator).double() + 1
    angle = 2 * math.pi * _uniform(n, generator)
    circle = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return circle + 0.08 * _normal((n, 2), generator)


def _swissroll(n: int, generator: torch.Generator) -> torch.Tensor:
    turn = 1.5 * math.pi * (1 + 2 * _uniform(n, generator))
    roll = torch.stack([turn * turn.cos(), turn * turn.sin()], dim=1) / 5.0
    return roll + 0.1 * _normal((n, 2), generator)


_SAMPLERS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "spirals": _spirals,
    "rings": _rings,
    "swissroll": _swissroll,
}
