"""Projector bridges (LLaVA-style baselines): every visual token becomes one LLM prompt.

The widths on either side are not configured here: the model calls ``build(vision_dim, llm_dim)`` with the
encoder's ``embed_dim`` and the LLM's ``hidden_size``.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

from vlgen.interfaces import Bridge, BridgeOutput


class LinearProjector(Bridge):
    """One linear map from the vision width to the LLM width, token by token.

    Args:
        layer_norm: normalise the visual tokens before projecting them (helps with unnormalised ViT features).
    """

    def __init__(self, layer_norm: bool = True) -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.proj: nn.Module = nn.Identity()

    def build(self, vision_dim: int, llm_dim: int) -> None:
        norm = nn.LayerNorm(vision_dim) if self.layer_norm else nn.Identity()
        self.proj = nn.Sequential(norm, nn.Linear(vision_dim, llm_dim))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> BridgeOutput:
        return BridgeOutput(prompts=self.proj(tokens), mask=mask)  # [B, N, Dv] -> [B, N, Dllm]


class MLPProjector(Bridge):
    """A GELU MLP from the vision width to the LLM width, token by token.

    Args:
        num_layers: number of linear layers (2 is LLaVA-1.5's projector).
        hidden_dim: width of the hidden layers; defaults to the LLM width.
        layer_norm: normalise the visual tokens first.
        dropout: dropout between layers.
    """

    def __init__(
        self, num_layers: int = 2, hidden_dim: int | None = None, layer_norm: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"bridge.num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.layer_norm = layer_norm
        self.dropout = dropout
        self.mlp: nn.Module = nn.Identity()

    def build(self, vision_dim: int, llm_dim: int) -> None:
        hidden = self.hidden_dim or llm_dim
        widths = [vision_dim] + [hidden] * (self.num_layers - 1) + [llm_dim]
        layers: list[nn.Module] = [nn.LayerNorm(vision_dim)] if self.layer_norm else []
        for i, (w_in, w_out) in enumerate(pairwise(widths)):
            if i:
                layers += [nn.GELU(), nn.Dropout(self.dropout)]
            layers.append(nn.Linear(w_in, w_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> BridgeOutput:
        return BridgeOutput(prompts=self.mlp(tokens), mask=mask)  # [B, N, Dv] -> [B, N, Dllm]
