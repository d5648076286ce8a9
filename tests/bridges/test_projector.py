"""Projector bridges: widths derived by build(), token count preserved, trainable."""

from __future__ import annotations

import pytest
import torch

from vlgen.bridges import LinearProjector, MLPProjector


@pytest.mark.parametrize("bridge", [LinearProjector(), MLPProjector(num_layers=3, hidden_dim=16)])
def test_shapes_and_gradients(bridge):
    bridge.build(vision_dim=24, llm_dim=40)
    x = torch.randn(2, 7, 24)
    out = bridge(x)
    assert out.prompts.shape == (2, 7, 40) and out.losses == {}
    out.prompts.sum().backward()
    assert all(p.grad is not None for p in bridge.parameters())


def test_mlp_depth():
    bridge = MLPProjector(num_layers=3, layer_norm=False)
    bridge.build(8, 12)
    linears = [m for m in bridge.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 12), (12, 12), (12, 12)]
    with pytest.raises(ValueError, match="num_layers"):
        MLPProjector(num_layers=0)
