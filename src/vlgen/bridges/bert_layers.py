"""BERT's layer parts with Hugging Face's parameter names, shared by the Q-Former and the token-merging connector.

``BertAttention`` is ``attention.{query,key,value}`` + ``output.{dense,LayerNorm}`` (Hugging Face's
``attention.self.*`` is ``attention.attention.*`` here); ``intermediate`` and ``AddNorm`` make the feed-forward.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.activations import ACT2FN


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> Tensor:
        return self.attend(x, kv, bias)[0]

    def attend(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """The attention output ``[B, L, H]`` and the keys ``[B, heads, S, H / heads]`` it used."""
        # [B, L, H] -> [B, heads, L, H / heads]
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.query(x), self.key(kv), self.value(kv))
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2), k  # [B, heads, L, H / heads] -> [B, L, H]


class AddNorm(nn.Module):
    """BERT's ``dense -> dropout -> LayerNorm(x + residual)`` (``BertSelfOutput`` / ``BertOutput``)."""

    def __init__(self, width_in: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: transformers.BertConfig, kv_width: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(
            c.hidden_size, c.num_attention_heads, kv_width, c.attention_probs_dropout_prob
        )
        self.output = AddNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> Tensor:
        return self.output(self.attention(x, kv, bias), x)


def intermediate(c: transformers.BertConfig) -> nn.Sequential:
    return nn.Sequential(OrderedDict(dense=nn.Linear(c.hidden_size, c.intermediate_size), act=ACT2FN[c.hidden_act]))


def init_bert_module(module: nn.Module, std: float) -> None:
    """BERT's initialisation of one module (use with ``Module.apply``): normal linear and embedding weights, zero
    biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
