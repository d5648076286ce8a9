"""Where a Q-Former's weights come from: a BERT checkpoint (key mapping), a Hugging Face BLIP-2 directory, or a
BLIP-2 stage-1 Lightning checkpoint. Kept apart from the module itself (:mod:`vlgen.bridges.qformer`), which calls
these while it is constructed and built.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import transformers

from vlgen.errors import ConfigError
from vlgen.loading import read_checkpoint, read_weights

if TYPE_CHECKING:
    from vlgen.bridges.qformer import QFormer

log = logging.getLogger(__name__)


def bert_key_of(ours: str) -> str | None:
    """The BERT (``BertForMaskedLM``) key a Q-Former weight is initialised from, or None for fresh weights."""
    if ours.startswith("embeddings."):
        return "bert." + ours
    if ours.startswith("qformer.layernorm."):
        return ours.replace("qformer.layernorm.", "bert.embeddings.LayerNorm.")
    if ours.startswith("qformer.encoder.layer.") and ".crossattention." not in ours:
        key = ours.replace("qformer.encoder.", "bert.encoder.").replace(".attention.attention.", ".attention.self.")
        return key.replace("_query.", ".")  # the query feed-forward starts as a copy of BERT's
    if ours.startswith("cls.predictions."):
        return ours
    return None


def bert_config_from_blip2(
    blip2: transformers.PretrainedConfig, queries: int, frequency: int
) -> transformers.BertConfig:
    """The BERT-style config of a BLIP-2 model's Q-Former; the query count and cross-attention frequency must agree."""
    q = blip2.qformer_config
    if queries != blip2.num_query_tokens:
        raise ConfigError(f"bridge.num_queries is {queries}, but the BLIP-2 model has {blip2.num_query_tokens}")
    if frequency != q.cross_attention_frequency:
        raise ConfigError(
            f"bridge.cross_attention_frequency is {frequency}, but the BLIP-2 model uses {q.cross_attention_frequency}"
        )
    fields = (
        "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act hidden_dropout_prob "
        "attention_probs_dropout_prob max_position_embeddings initializer_range layer_norm_eps pad_token_id"
    ).split()
    return transformers.BertConfig(**{name: getattr(q, name) for name in fields})


def load_blip2_qformer(qformer: QFormer, path: str) -> None:
    """Load a Hugging Face BLIP-2 checkpoint's Q-Former, queries, projection and ``ln_vision`` into a built
    ``qformer`` (reading those tensors only); shapes that differ name the side that disagrees."""
    ours = qformer.state_dict()
    mapping = {k: k for k in ours if k.startswith(("qformer.", "query_tokens", "language_projection."))}
    if qformer.vision_norm:  # LAVIS's ln_vision is Hugging Face's vision_model.post_layernorm
        mapping.update({f"ln_vision.{n}": f"vision_model.post_layernorm.{n}" for n in ("weight", "bias")})
    theirs = read_weights(path, ("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))
    missing = [v for v in mapping.values() if v not in theirs]
    if missing:
        raise ConfigError(f"bridge.bert: {path} lacks {len(missing)} Q-Former weights, e.g. {missing[:3]}")
    for k, v in mapping.items():
        if theirs[v].shape != ours[k].shape:
            raise ConfigError(
                f"bridge.bert: {v} is {tuple(theirs[v].shape)} in {path}, {tuple(ours[k].shape)} here "
                "(check the encoder's width and the LLM's hidden size)"
            )
    qformer.load_state_dict({k: theirs[v] for k, v in mapping.items()}, strict=False)
    log.info("Q-Former: %d tensors loaded from BLIP-2 %s", len(mapping), path)


def summarise_keys(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_stage1_qformer(qformer: QFormer, ckpt_path: str) -> None:
    """Load the ``qformer.`` weights of a BLIP-2 stage-1 Lightning checkpoint into a built ``qformer``.

    Every Q-Former weight but the projection to the LLM must be in the checkpoint; the projection is loaded too when
    the checkpoint has one of the same shape (a stage 1 with P-Former alignment trains it). Checkpoint weights this
    Q-Former does not have (the text path when ``text_input`` is false) are skipped.
    """
    ckpt = read_checkpoint(ckpt_path, "bridge.init_from")
    theirs = {k[len("qformer.") :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("qformer.")}
    ours = qformer.state_dict()
    needed = [k for k in ours if not k.startswith("language_projection.")]
    missing = [k for k in needed if k not in theirs]
    if missing:
        raise ConfigError(f"bridge.init_from: {ckpt_path} lacks {len(missing)} Q-Former weights, e.g. {missing[:3]}")
    bad = [k for k in needed if theirs[k].shape != ours[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(f"bridge.init_from: {k} is {tuple(theirs[k].shape)} there, {tuple(ours[k].shape)} here")
    projection = [k for k in ours if k.startswith("language_projection.")]
    if projection and all(k in theirs and theirs[k].shape == ours[k].shape for k in projection):
        needed += projection  # trained in stage 1 by P-Former alignment (to the same LLM width): it carries over
    qformer.load_state_dict({k: theirs[k] for k in needed}, strict=False)
    skipped = sorted(set(theirs) - set(needed))
    log.info("Q-Former: %d tensors loaded from %s; skipped: %s", len(needed), ckpt_path, summarise_keys(skipped))
