"""EVLGen's connector: BERT-style layers that merge similar visual tokens as they go (arXiv 2310.03291).

The visual tokens are projected to the connector's width, given position embeddings and passed through transformer
encoder layers; after each layer's self-attention, ``r`` tokens are merged into their most similar partners by
bipartite soft matching on the attention keys (:mod:`vlgen.bridges.tome`), so the frozen LLM reads a few condensed
prompts: 257 ViT tokens through 12 layers at ``r = 19`` leave 29. Merged tokens are size-weighted averages and the
sizes travel through the layers; proportional attention (``log size`` added to the attention logits) is optional.
Trained with the LM loss alone, in one stage; its pooled feature (the first, protected token, or the size-weighted
mean) serves contrastive objectives such as the paper's beta term (:class:`~vlgen.objectives.SentenceContrast`).
Layer parameter names follow Hugging Face's BERT, so the layers (and the position embeddings) can start from a
BERT checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn

from vlgen.bridges.bert_layers import AddNorm, BertAttention, init_bert_module, intermediate
from vlgen.bridges.tome import bipartite_soft_matching, merge_schedule, proportional_attention_bias, tokens_after
from vlgen.errors import ConfigError, load_failure
from vlgen.interfaces import Bridge, BridgeOutput, count_parameters
from vlgen.loading import dtype_kwarg, resolve_name_or_path

log = logging.getLogger(__name__)

MergeR = int | str | list[int] | tuple[int, float]  # in YAML / on the command line: 19, "8:-1" or [r0, r1, ...]


@dataclass(frozen=True)
class MergeOptions:
    """How a :class:`MergingLayer` merges: see :class:`TokenMergingConnector`'s arguments of the same names."""

    protect_first: bool = True
    size_weighted: bool = True
    proportional_attention: bool = False


class MergingLayer(nn.Module):
    """A BERT layer with a token-merging step between its self-attention and its feed-forward."""

    def __init__(self, c: transformers.BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(c, c.hidden_size)
        self.intermediate = intermediate(c)
        self.output = AddNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)

    def forward(
        self, x: Tensor, size: Tensor, mask: Tensor | None, r: int, merging: MergeOptions
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``x [B, N, H]``, ``size [B, N, 1]`` (0 on padding), ``mask [B, N]`` -> the same with ``N - r`` tokens."""
        bias = None
        if merging.proportional_attention:
            bias = proportional_attention_bias(size).to(x.dtype)  # log 0 = -inf hides padding too
        elif mask is not None:
            bias = torch.zeros_like(mask, dtype=x.dtype).masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None]
        attended, keys = self.attention.attention.attend(x, x, bias)
        x = self.attention.output(attended, x)
        if r > 0:
            # The keys, averaged over heads, say how alike two tokens are.
            plan = bipartite_soft_matching(keys.mean(1), r, merging.protect_first, mask)
            weight = size if merging.size_weighted else (size > 0).to(size.dtype)
            x = plan(torch.where(weight > 0, x * weight, 0), "sum") / plan(weight, "sum").clamp(min=1e-6)
            size, mask = plan(size, "sum"), plan.mask
        return self.output(self.intermediate(x), x), size, mask


class TokenMergingConnector(Bridge):
    """EVLGen's connector as a vlgen bridge: ``[B, N, Dv]`` visual tokens -> ``[B, N - sum(r), Dllm]`` prompts.

    Args:
        bert: a BERT checkpoint (hub id, local directory or ``pkg:NAME``) whose first ``num_layers`` layers and
            position embeddings start the connector (the paper: bert-base-uncased); ``None`` for fresh weights of
            the shape below.
        num_layers: connector layers.
        r: tokens merged per layer: an int, a per-layer list (one entry per layer, each >= 0), or a schedule around
            ``r``: the string ``"r:inflect"`` (``"8:-1"``, the form YAML and the command line take) or the tuple
            ``(r, inflect)`` (:func:`vlgen.bridges.tome.merge_schedule`); capped so no layer merges more than half
            its tokens.
        hidden_size / num_heads / intermediate_size: the layers' shape when ``bert`` is ``None``.
        dropout: hidden and attention dropout (BERT's own values when loading one, else 0.1).
        proportional_attention: add ``log size`` of each key token to the attention logits.
        protect_first: never merge the first token (the ViT's [CLS]); it stays first.
        size_weighted: merged tokens are averages weighted by how many inputs each stands for (ToMe); ``false``
            averages the tokens of a group equally, as EVLGen's reference code does.
        vision_norm: LayerNorm on the visual tokens first (BLIP-2 / EVLGen's ``ln_vision``).
    """

    def __init__(
        self,
        bert: str | None = None,
        num_layers: int = 12,
        r: MergeR = 19,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        dropout: float | None = None,
        proportional_attention: bool = False,
        protect_first: bool = True,
        size_weighted: bool = True,
        vision_norm: bool = True,
    ) -> None:
        super().__init__()
        source = None
        if bert is None:
            c = transformers.BertConfig(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
            )
        else:
            path = resolve_name_or_path(bert, "bridge.bert")
            try:
                source = transformers.BertModel.from_pretrained(path, **dtype_kwarg("float32"))
            except (OSError, ValueError) as err:
                raise ConfigError(f"bridge.bert: cannot load {bert!r}: {load_failure(err)}") from None
            c = source.config
            if not 1 <= num_layers <= c.num_hidden_layers:
                raise ConfigError(f"bridge.num_layers must be in 1..{c.num_hidden_layers} for {bert}, got {num_layers}")
            c.num_hidden_layers = num_layers
        if dropout is not None:
            c.hidden_dropout_prob = c.attention_probs_dropout_prob = dropout
        self.config, self.r = c, r
        try:  # a wrong r stops here, with one line, not at the first batch
            merge_schedule(r, num_layers, 10**6, protect_first)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bridge.r: {err}") from None
        self.merging = MergeOptions(protect_first, size_weighted, proportional_attention)
        self.protect_first, self.vision_norm = protect_first, vision_norm
        self.merge_fraction = 1.0  # the share of each layer's r applied; vlgen.callbacks.MergeRamp raises it to 1
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(MergingLayer(c) for _ in range(num_layers))
        self.ln_vision: nn.Module = nn.Identity()
        self.input_proj: nn.Module | None = None
        self.projection: nn.Module | None = None
        self._logged_counts: set[int] = set()
        self.apply(lambda m: init_bert_module(m, c.initializer_range))
        if source is not None:
            self._copy_from_bert(source, bert)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def block_modules(self) -> list[nn.Module]:
        """The connector's layers (``MergingLayer``: attention, the merge, the feed-forward)."""
        return list(self.layers)

    @torch.no_grad()
    def _copy_from_bert(self, source: nn.Module, name: str) -> None:
        theirs = source.state_dict()
        # BERT adds its token-type-0 embedding to every position: folded into the position embeddings here.
        position = (
            theirs["embeddings.position_embeddings.weight"] + theirs["embeddings.token_type_embeddings.weight"][0]
        )
        self.position_embeddings.weight.copy_(position)
        self.embed_norm.load_state_dict(
            {"weight": theirs["embeddings.LayerNorm.weight"], "bias": theirs["embeddings.LayerNorm.bias"]}
        )
        for i, layer in enumerate(self.layers):
            prefix = f"encoder.layer.{i}."
            layer.load_state_dict(
                {k: theirs[prefix + k.replace("attention.attention.", "attention.self.")] for k in layer.state_dict()}
            )
        log.info("connector: position embeddings and %d layers loaded from BERT %s", len(self.layers), name)

    def build(self, vision_dim: int, llm_dim: int) -> None:
        self.ln_vision = nn.LayerNorm(vision_dim) if self.vision_norm else nn.Identity()
        self.input_proj = nn.Linear(vision_dim, self.hidden_size)
        self.projection = nn.Linear(self.hidden_size, llm_dim)
        trainable, fixed = count_parameters(self)
        log.info("connector: %s trainable, %s frozen parameters", f"{trainable:,}", f"{fixed:,}")

    def schedule(self, num_tokens: int) -> list[int]:
        """Tokens merged in each layer for ``num_tokens`` inputs, at the current ramp fraction."""
        full = merge_schedule(self.r, len(self.layers), num_tokens, self.protect_first)
        return [round(r * self.merge_fraction) for r in full]

    def prompt_count(self, num_tokens: int) -> int:
        """How many prompts ``num_tokens`` visual tokens become (at the full schedule)."""
        schedule = merge_schedule(self.r, len(self.layers), num_tokens, self.protect_first)
        return tokens_after(num_tokens, schedule, self.protect_first)[-1]

    @property
    def pooled_dim(self) -> int:
        """The connector's width: the pooled feature is its first (protected) token or its size-weighted mean."""
        return self.hidden_size

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> BridgeOutput:
        assert self.input_proj is not None and self.projection is not None, "call build() before forward()"
        n = tokens.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ConfigError(
                f"bridge: {n} visual tokens, but the connector has {self.position_embeddings.num_embeddings} positions"
            )
        x = self.input_proj(self.ln_vision(tokens))
        x = self.dropout(self.embed_norm(x + self.position_embeddings.weight[:n]))
        size = torch.ones_like(x[..., :1]) if mask is None else mask[..., None].to(x.dtype)
        schedule = self.schedule(n)
        for layer, r in zip(self.layers, schedule, strict=True):
            x, size, mask = layer(x, size, mask, r, self.merging)
        if self.merge_fraction == 1.0 and n not in self._logged_counts:
            self._logged_counts.add(n)
            log.info("connector: %d visual tokens -> %d prompts (r per layer %s)", n, x.shape[1], schedule)
        # The pooled feature: the protected first token (a ViT's [CLS]) or the size-weighted mean
        pooled = x[:, 0] if self.protect_first else (x * size).sum(1) / size.sum(1).clamp(min=1e-6)
        return BridgeOutput(self.projection(x), mask, pooled=pooled)
