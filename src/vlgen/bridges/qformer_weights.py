"""Where a Q-Former's weights come from, as key maps: a BERT checkpoint, a Hugging Face BLIP-2 directory, or a
BLIP-2 stage-1 Lightning checkpoint. Names only, no modules: :mod:`vlgen.bridges.qformer` reads a source through
these and hands the renamed tensors to :func:`vlgen.loading.load_checked`.
"""

from __future__ import annotations

import transformers
from torch import Tensor

from vlgen.errors import ConfigError
from vlgen.loading import read_checkpoint, read_weights, rename_keys

# The parts of a Hugging Face BLIP-2 checkpoint a Q-Former takes; only these tensors are read.
BLIP2_PREFIXES = ("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm.")


def bert_key_of(ours: str) -> str | None:
    """The BERT (``BertForMaskedLM``) key a Q-Former weight is initialised from, or None for fresh weights.

    It maps our key to BERT's (not the other way) because one BERT feed-forward starts both the query and the text
    feed-forward of a layer.
    """
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


def blip2_key_to_qformer(key: str, vision_norm: bool) -> str | None:
    """The Q-Former key a Hugging Face BLIP-2 tensor loads into, or None when it is not the Q-Former's.

    The names agree key for key (``qformer.*``, ``query_tokens``, ``language_projection.*``) but for LAVIS's
    ``ln_vision``, which Hugging Face keeps as ``vision_model.post_layernorm`` (taken only with ``vision_norm``).
    """
    if key.startswith(("qformer.", "language_projection.")) or key == "query_tokens":
        return key
    norm = "vision_model.post_layernorm."
    if vision_norm and key.startswith(norm):
        return "ln_vision." + key[len(norm) :]
    return None


def read_blip2_qformer(path: str, vision_norm: bool) -> dict[str, Tensor]:
    """The Q-Former tensors of a Hugging Face BLIP-2 directory under Q-Former names (only those tensors are read)."""
    return rename_keys(read_weights(path, BLIP2_PREFIXES), lambda key: blip2_key_to_qformer(key, vision_norm))


def stage1_key_to_qformer(key: str) -> str | None:
    """The Q-Former key a BLIP-2 stage-1 checkpoint tensor loads into: its ``qformer.`` weights, prefix removed."""
    return key[len("qformer.") :] if key.startswith("qformer.") else None


def is_stage1_optional(key: str) -> bool:
    """Whether a Q-Former key may stay fresh when starting from stage 1: the projection to the LLM, which a stage 1
    trains only with P-Former alignment, carries over only when the checkpoint has it with this Q-Former's shape."""
    return key.startswith("language_projection.")


def read_stage1_qformer(ckpt_path: str) -> dict[str, Tensor]:
    """The ``qformer.`` weights of a BLIP-2 stage-1 Lightning checkpoint under Q-Former names."""
    ckpt = read_checkpoint(ckpt_path, "bridge.init_from")
    return rename_keys(ckpt.get("state_dict", {}), stage1_key_to_qformer)
