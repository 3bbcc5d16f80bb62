"""The time-input option of the time embedding (paper Table 1c ablation); the tangent option (1b) is
tested in test_objective_plugins.py."""
from __future__ import annotations

import pytest
import torch

from meanflow import MeanFlowLoss
from meanflow.models import create
from meanflow.models.embeddings import TIME_INPUTS


@pytest.mark.parametrize("time_input", list(TIME_INPUTS))
def test_time_input_dual_pass_matches_forward_ad(time_input):
    torch.manual_seed(0)
    model = create("mlp", dim=2, width=16, depth=2, time_input=time_input).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    outs = [MeanFlowLoss(ratio=0.5, jvp=mode).targets(model, x, generator=torch.Generator().manual_seed(2)) for mode in ("dual", "full")]
    torch.testing.assert_close(outs[0].dudt, outs[1].dudt, rtol=1e-10, atol=1e-12)
    embeds = sorted(name.split(".")[1] for name in model.state_dict() if name.startswith("cond.") and name.endswith("mlp.0.weight"))
    assert embeds == sorted(f"{n}_embed" for n in TIME_INPUTS[time_input])


def test_time_input_h_only_sees_t_minus_r():
    torch.manual_seed(0)
    z = torch.randn(8, 2, dtype=torch.float64)
    r, t = torch.rand(8, dtype=torch.float64) * 0.3, 0.5 + torch.rand(8, dtype=torch.float64) * 0.3
    only_h = create("mlp", dim=2, width=16, depth=2, time_input="h").double()
    torch.testing.assert_close(only_h(z, r, t), only_h(z, r + 0.2, t + 0.2))
    default = create("mlp", dim=2, width=16, depth=2).double()
    assert not torch.allclose(default(z, r, t), default(z, r + 0.2, t + 0.2))
    with pytest.raises(ValueError, match="time_input must be one of"):
        create("mlp", dim=2, time_input="r")
