"""The BLIP-2 Querying Transformer (Q-Former) as a vlgen bridge.

Learned queries and (optionally) text share BERT self-attention layers; every ``cross_attention_frequency``-th layer
lets the queries, and only them, cross-attend to the visual tokens; queries and text have separate feed-forward
weights. Everything is initialised from a BERT checkpoint (embeddings, self-attention, the feed-forward copied into
both branches, the MLM head) except the cross-attention, which :meth:`QFormer.build` creates fresh with the
encoder's width. Parameter names follow Hugging Face's BLIP-2 (``query_tokens``, ``qformer.layernorm``,
``qformer.encoder.layer.N.{attention,crossattention,intermediate_query,output_query}``, ``embeddings``,
``language_projection``), so BLIP-2 checkpoints map onto this module key for key. The self-attention mask picks the
stage-1 mode: ``unimodal`` (ITC), ``bidirectional`` (ITM) or ``causal`` (ITG: queries see queries, text sees every
query and the text before it). Given a Hugging Face BLIP-2 directory in place of BERT, the Q-Former takes that
model's shape and, once built, all of its weights: ``qformer.*``, ``query_tokens``, ``language_projection`` and
``vision_model.post_layernorm`` as ``ln_vision`` (see :mod:`vlgen.encoders.hf_vision`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.activations import ACT2FN

from vlgen.bridges.bert_layers import AddNorm, BertAttention, init_bert_module, intermediate
from vlgen.bridges.qformer_weights import (
    bert_config_from_blip2,
    bert_key_of,
    is_stage1_optional,
    read_blip2_qformer,
    read_stage1_qformer,
)
from vlgen.errors import ConfigError, load_failure
from vlgen.interfaces import Bridge, BridgeOutput, count_parameters, freeze
from vlgen.loading import blip2_config, dtype_kwarg, load_checked, resolve_name_or_path

log = logging.getLogger(__name__)

Attn = Literal["unimodal", "bidirectional", "causal"]


def attention_bias(num_queries: int, text_mask: Tensor | None, batch: int, attn: Attn, dtype: torch.dtype) -> Tensor:
    """Additive self-attention bias ``[B, 1, L, L]`` over ``[queries; text]``, ``L = Q + T``.

    ``unimodal``: queries and text do not see each other; ``bidirectional``: everything sees everything;
    ``causal``: queries see the queries only, text sees all queries and the text up to itself. Padded text is never
    attended to (``text_mask [B, T]``, 1 = real).
    """
    device = text_mask.device if text_mask is not None else None
    length = num_queries + (0 if text_mask is None else text_mask.shape[1])
    pos = torch.arange(length, device=device)
    is_query = pos < num_queries
    if attn == "bidirectional":
        allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    elif attn == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    elif attn == "causal":
        allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))
    else:
        raise ValueError(f"unknown attention mode {attn!r}")
    keys = torch.ones(batch, length, dtype=torch.bool, device=device)
    if text_mask is not None:
        keys[:, num_queries:] = text_mask.bool()
    allowed = allowed[None] & keys[:, None, :]  # [B, L (from), L (to)]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class QFormerLayer(nn.Module):
    """Shared self-attention, cross-attention for the queries (when built), separate query/text feed-forwards."""

    def __init__(self, c: transformers.BertConfig, text_input: bool) -> None:
        super().__init__()
        self.attention = BertAttention(c, c.hidden_size)
        self.crossattention: BertAttention | None = None  # created by QFormer.build on cross-attention layers
        ffn = (c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)
        if text_input:
            self.intermediate, self.output = intermediate(c), AddNorm(c.intermediate_size, *ffn)
        self.intermediate_query, self.output_query = intermediate(c), AddNorm(c.intermediate_size, *ffn)

    def forward(self, x: Tensor, bias: Tensor | None, num_queries: int, vision: Tensor, vision_bias: Tensor) -> Tensor:
        x = self.attention(x, x, bias)
        parts = []
        if num_queries:
            q = x[:, :num_queries]
            if self.crossattention is not None:
                q = self.crossattention(q, vision, vision_bias)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if x.shape[1] > num_queries:
            t = x[:, num_queries:]
            parts.append(self.output(self.intermediate(t), t))
        return torch.cat(parts, dim=1)


def _grown(bert: Tensor, ours: Tensor) -> Tensor:
    """A BERT tensor ``[V, ...]`` given our rows past ``V`` (the vocabulary grew by [DEC]): ``[V', ...]``; any other
    shape as it is (a mismatch for the loader to name)."""
    if bert.shape[0] < ours.shape[0] and bert.shape[1:] == ours.shape[1:]:
        return torch.cat([bert, ours[bert.shape[0] :]])
    return bert


class _LMHead(nn.Module):
    """BERT's MLM head (``predictions.transform``, ``predictions.bias``); the decoder is the word-embedding matrix,
    tied as in LAVIS."""

    def __init__(self, c: transformers.BertConfig, vocab_size: int) -> None:
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = nn.Sequential(
            OrderedDict(
                dense=nn.Linear(c.hidden_size, c.hidden_size),
                act=ACT2FN[c.hidden_act],
                LayerNorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
            )
        )
        self.predictions.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.predictions.transform(x), word_embeddings, self.predictions.bias)


class QFormer(Bridge):
    """The BLIP-2 Q-Former: ``num_queries`` learned queries read the visual tokens through BERT layers.

    Args:
        bert: BERT checkpoint (hub id, local directory or ``pkg:NAME``) giving the layers and the tokenizer, or a
            Hugging Face BLIP-2 directory whose Q-Former (shape and weights) is taken whole.
        num_queries: number of learned queries, i.e. prompts given to the LLM.
        cross_attention_frequency: layer ``i`` cross-attends to the image when ``i % frequency == 0``.
        num_layers: keep only the first ``num_layers`` BERT layers (all by default).
        dropout: hidden and attention dropout; BERT's own values by default.
        frozen: keep the Q-Former fixed (the projection to the LLM still trains).
        vision_norm: LayerNorm on the visual tokens first (BLIP-2's ``ln_vision``).
        text_input: build the text path (word embeddings, text feed-forwards, LM head, tokenizer). Stage 1 needs
            it; a captioning bridge does not (Hugging Face's ``use_qformer_text_input``).
        init_from: a BLIP-2 stage-1 Lightning checkpoint whose ``qformer.`` weights are loaded after :meth:`build`;
            the projection to the LLM stays fresh unless the checkpoint has one of the same shape.
    """

    def __init__(
        self,
        bert: str,
        num_queries: int = 32,
        cross_attention_frequency: int = 2,
        num_layers: int | None = None,
        dropout: float | None = None,
        frozen: bool = False,
        vision_norm: bool = True,
        text_input: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if cross_attention_frequency < 1:
            raise ConfigError(f"bridge.cross_attention_frequency must be >= 1, got {cross_attention_frequency}")
        path = resolve_name_or_path(bert, "bridge.bert")
        blip2 = blip2_config(path)
        self.blip2_path = path if blip2 is not None else None
        self.vision_norm_eps = 1e-5  # LAVIS's ln_vision; a BLIP-2 directory says its own
        if blip2 is not None:
            source, info, c = None, {}, bert_config_from_blip2(blip2, num_queries, cross_attention_frequency)
            self.vision_norm_eps = float(blip2.vision_config.layer_norm_eps)
            if text_input:
                raise ConfigError("bridge.text_input: a BLIP-2 directory's Q-Former has no text path; use a BERT")
        else:
            try:
                source, info = transformers.BertForMaskedLM.from_pretrained(
                    path, output_loading_info=True, **dtype_kwarg("float32")
                )
            except (OSError, ValueError) as err:
                raise ConfigError(f"bridge.bert: cannot load {bert!r}: {load_failure(err)}") from None
            c = source.config
        if num_layers is not None and not 1 <= num_layers <= c.num_hidden_layers:
            raise ConfigError(f"bridge.num_layers must be in 1..{c.num_hidden_layers} for {bert}, got {num_layers}")
        c.num_hidden_layers = num_layers or c.num_hidden_layers
        if dropout is not None:
            c.hidden_dropout_prob = c.attention_probs_dropout_prob = dropout
        self.config, self.num_queries, self.frequency = c, num_queries, cross_attention_frequency
        self.frozen, self.vision_norm, self.text_input, self.init_from = frozen, vision_norm, text_input, init_from
        self.tokenizer = None
        vocab = c.vocab_size
        if text_input:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            if self.tokenizer.bos_token != "[DEC]":  # LAVIS decodes from a [DEC] token in place of [CLS]
                self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            vocab = max(vocab, len(self.tokenizer))
            self.embeddings = nn.ModuleDict(
                {
                    "word_embeddings": nn.Embedding(vocab, c.hidden_size, padding_idx=c.pad_token_id),
                    "position_embeddings": nn.Embedding(c.max_position_embeddings, c.hidden_size),
                }
            )
            self.cls = _LMHead(c, vocab)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, c.hidden_size))
        layers = nn.ModuleList(QFormerLayer(c, text_input) for _ in range(c.num_hidden_layers))
        self.qformer = nn.ModuleDict(
            {
                "layernorm": nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
                "dropout": nn.Dropout(c.hidden_dropout_prob),
                "encoder": nn.ModuleDict({"layer": layers}),
            }
        )
        self.ln_vision: nn.Module = nn.Identity()
        self.language_projection: nn.Module | None = None
        self._built = False
        self.apply(self._init_weights)
        if source is not None:
            self._copy_from_bert(source, missing=set(info["missing_keys"]), name=bert)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layers(self) -> nn.ModuleList:
        return self.qformer["encoder"]["layer"]  # type: ignore[return-value]

    def block_modules(self) -> list[nn.Module]:
        """The Q-Former's layers (``QFormerLayer``: self-attention, cross-attention once built, both feed-forwards)."""
        return list(self.layers)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        init_bert_module(module, std)
        if module is self:
            nn.init.normal_(self.query_tokens, std=std)

    @torch.no_grad()
    def _copy_from_bert(self, source: nn.Module, missing: set[str], name: str) -> None:
        """Start every weight :func:`bert_key_of` maps from the BERT ``source`` (``missing``: its fresh keys)."""
        theirs = {k: v for k, v in source.state_dict().items() if k not in missing}
        ours = self.state_dict()
        state = {}
        for key, value in ours.items():
            bert_key = bert_key_of(key)
            if bert_key in theirs:
                state[key] = _grown(theirs[bert_key], value)
        pulled = {bert_key_of(k) for k in state}
        unused = [k for k in theirs if k not in pulled and not k.startswith("cls.predictions.decoder.")]  # tied copies
        loaded = load_checked(
            self, state, "bridge.bert", f"BERT {name}", required=(), label="Q-Former", also_unused=unused
        )
        self.bert_keys = {k: str(bert_key_of(k)) for k in loaded.loaded}  # our key -> the BERT key it was copied from

    def build(self, vision_dim: int, llm_dim: int | None) -> None:
        """Create the cross-attention (keys/values of width ``vision_dim``) and the projection to ``llm_dim``.

        ``llm_dim=None`` (stage 1, no LLM) makes no projection: :meth:`forward` then returns the query outputs.
        """
        cross = [i for i in range(len(self.layers)) if i % self.frequency == 0]
        for i in cross:
            self.layers[i].crossattention = BertAttention(self.config, vision_dim)
            self.layers[i].crossattention.apply(self._init_weights)
        log.info("Q-Former: fresh cross-attention from width %d in layers %s", vision_dim, cross)
        self.ln_vision = nn.LayerNorm(vision_dim, eps=self.vision_norm_eps) if self.vision_norm else nn.Identity()
        self.language_projection = None if llm_dim is None else nn.Linear(self.hidden_size, llm_dim)
        self._built = True
        if self.blip2_path is not None:
            state = read_blip2_qformer(self.blip2_path, self.vision_norm)
            hint = "check the encoder's width and the LLM's hidden size"
            load_checked(self, state, "bridge.bert", f"BLIP-2 {self.blip2_path}", label="Q-Former", hint=hint)
        if self.init_from is not None:  # every weight but the projection to the LLM; weights we lack are skipped
            load_checked(
                self, read_stage1_qformer(self.init_from), "bridge.init_from", self.init_from,
                required=lambda k: not is_stage1_optional(k), skip_mismatched=is_stage1_optional, label="Q-Former",
            )  # fmt: skip
        if self.frozen:
            for child_name, child in self.named_children():
                if child_name != "language_projection":
                    freeze(child)
            self.query_tokens.requires_grad_(False)
        trainable, fixed = count_parameters(self)
        log.info("Q-Former: %s trainable, %s frozen parameters", f"{trainable:,}", f"{fixed:,}")

    def train(self, mode: bool = True) -> QFormer:
        super().train(mode)
        if self.frozen:  # a frozen Q-Former stays in eval mode (dropout off) whatever Lightning asks
            for child_name, child in self.named_children():
                if child_name != "language_projection":
                    child.train(False)
        return self

    # --- encoding -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int, pad_to_max: bool = True) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, each ``[B, T]``: truncated to ``max_length`` tokens and padded to
        ``T = max_length`` (as LAVIS does; equal shapes on every rank) or, with ``pad_to_max=False``, to the
        longest text only (the same results for less compute)."""
        if self.tokenizer is None:
            raise ConfigError("bridge.text_input must be true to encode text with the Q-Former")
        padding = "max_length" if pad_to_max else "longest"
        out = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return out["input_ids"].to(self.query_tokens.device), out["attention_mask"].to(self.query_tokens.device)

    def encode(
        self,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        attn: Attn = "bidirectional",
    ) -> Tensor:
        """Hidden states ``[B, Q + T, H]`` of ``[queries; text]``: queries when ``tokens [B, N, Dv]`` is given (with
        its ``mask [B, N]``), text when ``input_ids [B, T]`` is, under the self-attention mode ``attn``."""
        if tokens is None and input_ids is None:
            raise ValueError("encode needs visual tokens, text, or both")
        parts, num_queries, vision, vision_bias, bias = [], 0, None, None, None
        if tokens is not None:
            if not self._built:
                raise RuntimeError("QFormer.build(vision_dim, llm_dim) must be called before encoding images")
            vision = self.ln_vision(tokens.to(self.query_tokens.dtype))
            if mask is not None:  # padded visual tokens: [B, N] -> additive [B, 1, 1, N]
                vision_bias = torch.zeros(mask.shape, dtype=vision.dtype, device=vision.device)
                vision_bias = vision_bias.masked_fill(~mask.bool(), torch.finfo(vision.dtype).min)[:, None, None]
            num_queries = self.num_queries
            parts.append(self.query_tokens.expand(tokens.shape[0], -1, -1))
        if input_ids is not None:
            if self.tokenizer is None:
                raise ConfigError("bridge.text_input must be true to encode text with the Q-Former")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(
                self.embeddings["word_embeddings"](input_ids) + self.embeddings["position_embeddings"](positions)
            )
        x = self.qformer["dropout"](self.qformer["layernorm"](torch.cat(parts, dim=1)))  # [B, Q + T, H]
        if input_ids is not None:
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            bias = attention_bias(num_queries, text_mask, x.shape[0], attn, x.dtype)  # [B, 1, Q + T, Q + T]
        for layer in self.layers:
            x = layer(x, bias, num_queries, vision, vision_bias)
        return x

    def query_features(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Query outputs ``[B, Q, H]`` for visual tokens ``[B, N, Dv]``."""
        return self.encode(tokens, mask)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unimodal text outputs ``[B, T, H]`` (no queries; position 0 is [CLS])."""
        return self.encode(input_ids=input_ids, attention_mask=attention_mask)

    def joint(self, tokens: Tensor, mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Queries and text under the bidirectional mask (ITM): ``[B, Q + T, H]``."""
        return self.encode(tokens, mask, input_ids, attention_mask, attn="bidirectional")

    def itg_logits(
        self, tokens: Tensor, mask: Tensor | None, input_ids: Tensor, attention_mask: Tensor, keep: Tensor | None = None
    ) -> Tensor:
        """Next-token logits ``[B, T, V]`` under the multimodal causal mask, with [DEC] in place of [CLS]; with a
        boolean ``keep [B, T]``, only the kept positions' logits ``[K, V]`` (the vocabulary projection dominates
        the cost, so positions that predict padding are left out)."""
        assert self.tokenizer is not None
        dec = input_ids.clone()
        dec[:, 0] = self.tokenizer.bos_token_id
        hidden = self.encode(tokens, mask, dec, attention_mask, attn="causal")[:, self.num_queries :]  # [B, T, H]
        if keep is not None:
            hidden = hidden[keep]  # [B, T, H] -> [K, H]
        return self.cls(hidden, self.embeddings["word_embeddings"].weight)

    def prompt_count(self, num_tokens: int) -> int:
        """One prompt per learned query, whatever the number of visual tokens."""
        return self.num_queries

    @property
    def pooled_dim(self) -> int:
        """The pooled feature is the mean of the query outputs, of the Q-Former's width."""
        return self.hidden_size

    def output(self, queries: Tensor) -> BridgeOutput:
        """Query outputs ``[B, Q, H]`` as prompts ``[B, Q, Dllm]`` (projected when built with an LLM width) and
        their mean as the pooled feature ``[B, H]``."""
        prompts = queries if self.language_projection is None else self.language_projection(queries)
        return BridgeOutput(prompts=prompts, pooled=queries.mean(dim=1))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> BridgeOutput:
        return self.output(self.query_features(tokens, mask))  # [B, Q, H] -> prompts [B, Q, Dllm]

    def forward_with_text(
        self, tokens: Tensor, mask: Tensor | None, texts: list[str], max_length: int = 64
    ) -> BridgeOutput:
        """Prompts from queries that also read ``texts`` (one per sample, e.g. the question): queries and text share
        the bidirectional self-attention, as in BLIP-2's VQA fine-tuning and InstructBLIP's instruction-aware
        Q-Former; only the query outputs become prompts. Needs ``text_input: true``."""
        input_ids, attention_mask = self.tokenize(texts, max_length, pad_to_max=False)  # [B, T] each
        hidden = self.encode(tokens, mask, input_ids, attention_mask, attn="bidirectional")  # [B, Q + T, H]
        return self.output(hidden[:, : self.num_queries])
