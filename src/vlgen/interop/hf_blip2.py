"""Hugging Face BLIP-2 (``Blip2ForConditionalGeneration``) to a vlgen :class:`~vlgen.models.Captioner` and back.

Import composes the model from its three parts, each reading only its own tensors from the BLIP-2 directory:
:class:`~vlgen.encoders.HFBlip2Vision` (``vision_model.*`` without ``post_layernorm``), a
:class:`~vlgen.bridges.QFormer` given the directory as ``bert`` (``qformer.*``, ``query_tokens``,
``language_projection`` and ``vision_model.post_layernorm`` as its ``ln_vision``), and
:class:`~vlgen.llms.CausalLM` or :class:`~vlgen.llms.seq2seq.Seq2SeqLM` (``language_model.*``), chosen by
``config.use_decoder_only_language_model``. Export writes the same layout with ``save_pretrained`` plus a
``Blip2Processor`` (tokenizer with an ``<image>`` token, image processor). The vision tower exported is either an
:class:`~vlgen.encoders.HFBlip2Vision` or a plain timm ``VisionTransformer`` (class token, pre-norm blocks, GELU MLP,
no layer scale or q/k norm), whose weights map one to one onto ``Blip2VisionModel``. Hugging Face's model has no
place for vlgen's ``prompt``: pass it as the processor's ``text``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from torch import Tensor, nn

from vlgen.bridges import QFormer
from vlgen.encoders import HFBlip2Vision, TimmEncoder
from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder
from vlgen.llms import CausalLM, Decoding, Seq2SeqLM
from vlgen.loading import DType, blip2_config, resolve_name_or_path
from vlgen.lora import merged_state_dict
from vlgen.models import Captioner

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


def model_spec(path: str, prompt: str = "", decoding: Decoding | None = None, dtype: DType = "float32") -> dict:
    """The ``model:`` section (``class_path`` / ``init_args``) of a vlgen config that rebuilds BLIP-2 ``path``.

    The frozen parts (vision tower, LLM) and the Q-Former's initial weights are read from ``path`` itself.
    """
    resolved = resolve_name_or_path(path, "path")
    config = blip2_config(resolved)
    if config is None:
        raise ConfigError(f"{path} is not a Hugging Face BLIP-2 directory (config.json with model_type 'blip-2')")
    llm_class = "vlgen.llms.CausalLM" if config.use_decoder_only_language_model else "vlgen.llms.seq2seq.Seq2SeqLM"
    return {
        "class_path": "vlgen.models.Captioner",
        "init_args": {
            "encoder": {
                "class_path": "vlgen.encoders.HFBlip2Vision",
                "init_args": {"name_or_path": path, "dtype": dtype},
            },
            "bridge": {
                "class_path": "vlgen.bridges.QFormer",
                "init_args": {
                    "bert": path,
                    "num_queries": int(config.num_query_tokens),
                    "cross_attention_frequency": int(config.qformer_config.cross_attention_frequency),
                },
            },
            "llm": {
                "class_path": llm_class,
                "init_args": {"name_or_path": path, "dtype": dtype, "decoding": asdict(decoding or Decoding())},
            },
            "prompt": prompt,
        },
    }


def load_hf_blip2(path: str, prompt: str = "", decoding: Decoding | None = None, dtype: DType = "float32") -> Captioner:
    """A :class:`Captioner` with every weight of the Hugging Face BLIP-2 model in ``path``.

    Args:
        path: a ``Blip2ForConditionalGeneration`` directory (``save_pretrained`` layout, safetensors).
        prompt: text between the visual prompts and the caption ("" captions from the BOS token as Hugging Face
            does without text; BLIP-2's COCO fine-tuning used "a photo of").
        decoding: generation settings of the LLM.
        dtype: dtype of the frozen vision tower and LLM (the Q-Former stays in float32, as in Hugging Face).
    """
    args = model_spec(path, prompt, decoding, dtype)["init_args"]
    encoder = HFBlip2Vision(**args["encoder"]["init_args"])
    bridge = QFormer(**args["bridge"]["init_args"])
    llm_args = {**args["llm"]["init_args"], "decoding": decoding or Decoding()}
    llm_class = CausalLM if args["llm"]["class_path"] == "vlgen.llms.CausalLM" else Seq2SeqLM
    return Captioner(encoder, bridge, llm_class(**llm_args), prompt=prompt)


# --- export -----------------------------------------------------------------------------------------------------
def export_hf_blip2(model: Captioner, out_dir: str | Path) -> Path:
    """Write ``model`` as a ``Blip2ForConditionalGeneration`` directory with its ``Blip2Processor``.

    Args:
        model: a captioner whose bridge is a built :class:`QFormer`, whose LLM is a ``CausalLM`` or ``Seq2SeqLM``
            and whose encoder is an :class:`HFBlip2Vision` or a plain timm ViT (:class:`TimmEncoder`).
        out_dir: the directory to write (created).

    Returns:
        ``out_dir``, loadable with ``Blip2ForConditionalGeneration.from_pretrained`` and ``Blip2Processor``.
    """
    bridge, llm = model.bridge, model.llm
    if not isinstance(bridge, QFormer) or bridge.language_projection is None:
        raise ConfigError("export to BLIP-2: the bridge must be a vlgen.bridges.QFormer with a projection to the LLM")
    if not hasattr(llm, "model") or not hasattr(llm, "tokenizer"):
        raise ConfigError("export to BLIP-2: the LLM must be a vlgen.llms.CausalLM or Seq2SeqLM")
    vision_config, weights, (image_size, mean, std), tower_norm = _vision_part(model.encoder)
    weights = {f"vision_model.{k}": v for k, v in weights.items()}
    weights.update(_vision_norm(bridge, tower_norm, vision_config))
    weights.update({k: v for k, v in bridge.state_dict().items() if k.startswith(("qformer.", "language_projection."))})
    weights["query_tokens"] = bridge.query_tokens.detach()
    # LoRA adapters, if any, merged into the LLM's weights: BLIP-2 has no place for them.
    weights.update({f"language_model.{k}": v for k, v in merged_state_dict(llm.model).items()})

    tokenizer = copy.deepcopy(llm.tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True
        )
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    q = bridge.config
    qformer_config = transformers.Blip2QFormerConfig(
        **{k: getattr(q, k) for k in _QFORMER_FIELDS},
        cross_attention_frequency=bridge.frequency,
        encoder_hidden_size=vision_config["hidden_size"],
    )
    config = transformers.Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config.to_dict(),
        text_config=llm.model.config.to_dict(),
        num_query_tokens=bridge.num_queries,
        image_token_index=image_token,
    )
    with torch.device("meta"):  # no second copy of the LLM: the real tensors are assigned below
        hf = transformers.Blip2ForConditionalGeneration(config)
    expected = set(hf.state_dict())
    unknown = sorted(set(weights) - expected)
    weights = {k: v for k, v in weights.items() if k in expected}  # e.g. a stage-1 Q-Former's text path
    missing = sorted(expected - set(weights))
    if missing:
        raise ConfigError(f"export to BLIP-2: no vlgen weights for {len(missing)} tensors, e.g. {missing[:3]}")
    hf.load_state_dict(weights, assign=True)
    hf.tie_weights()
    if image_token >= hf.get_input_embeddings().num_embeddings:  # Hugging Face embeds <image> before replacing it
        hf.language_model.resize_token_embeddings(image_token + 1, mean_resizing=False)
        config.text_config.vocab_size = image_token + 1
        log.warning("export to BLIP-2: the LLM's vocabulary grew by %s (a row Hugging Face never reads)", IMAGE_TOKEN)
    if unknown:
        log.info("export to BLIP-2: not exported (Hugging Face has no place for them): %s", ", ".join(unknown[:8]))
    out = Path(out_dir)
    hf.save_pretrained(out)
    image_processor = transformers.BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std)
    )
    transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=bridge.num_queries).save_pretrained(out)
    log.info("exported BLIP-2 to %s", out)
    return out


_QFORMER_FIELDS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act hidden_dropout_prob "
    "attention_probs_dropout_prob max_position_embeddings initializer_range layer_norm_eps pad_token_id"
).split()


def _vision_part(encoder: VisualEncoder) -> tuple[dict, dict[str, Tensor], tuple[int, Any, Any], nn.Module | None]:
    """``(vision_config, weights without post_layernorm, (image_size, mean, std), the tower's own final norm)``."""
    if isinstance(encoder, HFBlip2Vision):
        weights = {k: v for k, v in encoder.model.state_dict().items() if not k.startswith("post_layernorm.")}
        norm = encoder.model.post_layernorm if encoder.final_norm else None
        return encoder.model.config.to_dict(), weights, (encoder.image_size, encoder.mean, encoder.std), norm
    if isinstance(encoder, TimmEncoder):
        return _timm_vit_part(encoder)
    raise ConfigError(
        f"export to BLIP-2: cannot export a {type(encoder).__name__}; exportable encoders are "
        "vlgen.encoders.HFBlip2Vision and vlgen.encoders.TimmEncoder with a plain timm VisionTransformer"
    )


def _vision_norm(bridge: QFormer, tower_norm: nn.Module | None, vision_config: dict) -> dict[str, Tensor]:
    """``vision_model.post_layernorm``: the Q-Former's ``ln_vision`` or the tower's final norm (exactly one)."""
    if bridge.vision_norm == (tower_norm is not None):
        raise ConfigError(
            "export to BLIP-2: exactly one LayerNorm between the vision tower and the Q-Former is exportable "
            "(QFormer.vision_norm true with the encoder's final norm off, or the reverse)"
        )
    norm = bridge.ln_vision if bridge.vision_norm else tower_norm
    assert isinstance(norm, nn.LayerNorm)
    if abs(norm.eps - vision_config["layer_norm_eps"]) > 1e-12:
        log.warning(
            "export to BLIP-2: ln_vision eps %g differs from the tower's %g; Hugging Face uses the tower's for both",
            norm.eps,
            vision_config["layer_norm_eps"],
        )
    return {"vision_model.post_layernorm.weight": norm.weight.detach(), "vision_model.post_layernorm.bias": norm.bias}


def _timm_vit_part(encoder: TimmEncoder) -> tuple[dict, dict[str, Tensor], tuple[int, Any, Any], nn.Module | None]:
    """Map a plain timm ``VisionTransformer`` onto ``Blip2VisionModel`` names, refusing anything that differs."""
    vit = encoder.model
    plain = isinstance(vit, timm.models.vision_transformer.VisionTransformer) and vit.cls_token is not None
    plain = plain and not getattr(vit, "no_embed_class", False) and getattr(vit, "num_reg_tokens", 0) == 0
    plain = plain and isinstance(vit.norm_pre, nn.Identity) and isinstance(vit.patch_embed.norm, nn.Identity)
    for block in vit.blocks if plain else ():  # not a ViT (a CNN...): nothing more to look at
        identities = [block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, getattr(block.attn, "norm", None)]
        plain = plain and all(m is None or isinstance(m, nn.Identity) for m in identities)
        plain = plain and isinstance(getattr(block.mlp, "act", None), nn.GELU) and block.mlp.act.approximate == "none"
        plain = plain and isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity)
    size = vit.patch_embed.img_size if plain else (0, 1)
    if not plain or size[0] != size[1] or len(vit.blocks) == 0:
        raise ConfigError(
            f"export to BLIP-2: timm model {type(vit).__name__} is not a plain square ViT with a class token "
            "(no layer scale, q/k norm, register tokens or non-GELU MLP), so it has no Blip2VisionModel equivalent"
        )
    first = vit.blocks[0]
    state = merged_state_dict(vit)  # LoRA adapters, if any, merged into their layers' weights, under the plain names
    weights = {
        "embeddings.class_embedding": state["cls_token"],
        "embeddings.position_embedding": state["pos_embed"],
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
    }
    rename = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv"}
    rename.update({"attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for i in range(len(vit.blocks)):
        for theirs, ours in rename.items():
            weight = state[f"blocks.{i}.{theirs}.weight"]
            weights[f"encoder.layers.{i}.{ours}.weight"] = weight
            bias = state.get(f"blocks.{i}.{theirs}.bias")  # a ViT without qkv bias gets a zero one (HF always has it)
            weights[f"encoder.layers.{i}.{ours}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    weights = {k: v.detach() for k, v in weights.items()}
    config = transformers.Blip2VisionConfig(
        hidden_size=vit.embed_dim,
        intermediate_size=first.mlp.fc1.out_features,
        num_hidden_layers=len(vit.blocks),
        num_attention_heads=first.attn.num_heads,
        image_size=size[0],
        patch_size=vit.patch_embed.patch_size[0],
        hidden_act="gelu",
        layer_norm_eps=first.norm1.eps,
        qkv_bias=True,
    )
    data = timm.data.resolve_data_config({}, model=vit)
    data.update(encoder.transform_overrides)
    norm = vit.norm if isinstance(vit.norm, nn.LayerNorm) else None
    return config.to_dict(), weights, (size[0], data["mean"], data["std"]), norm
