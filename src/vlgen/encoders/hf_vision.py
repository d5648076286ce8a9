"""Hugging Face's BLIP-2 vision tower (``Blip2VisionModel``, an EVA/CLIP-style ViT) as a vlgen visual encoder.

It loads from a ``Blip2ForConditionalGeneration`` directory (``config.vision_config`` and only the
``vision_model.*`` tensors of its safetensors) or from a standalone ``Blip2VisionModel`` directory. One mapping of
BLIP-2's weights is used throughout vlgen: Hugging Face's ``vision_model.post_layernorm`` is LAVIS's ``ln_vision``,
which belongs to the (trainable) Q-Former, so by default this encoder returns the last layer's tokens *before* that
norm and :class:`vlgen.bridges.QFormer` (``vision_norm: true``) loads ``post_layernorm`` as its ``ln_vision``.
``final_norm: true`` keeps the norm here instead, for bridges without their own (then ``vision_norm: false``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from torchvision import transforms as T

from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder, set_frozen
from vlgen.loading import (
    DType,
    as_autocast_leaves,
    blip2_config,
    dtype_kwarg,
    load_part,
    own_precision,
    resolve_name_or_path,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFBlip2Vision(VisualEncoder):
    """``Blip2VisionModel`` returning its tokens ``[B, 1 + N, D]`` (class token first).

    Args:
        name_or_path: a BLIP-2 (``Blip2ForConditionalGeneration``) or ``Blip2VisionModel`` directory or hub id,
            or ``pkg:PACKAGE``.
        frozen: keep every parameter fixed and the module in eval mode.
        final_norm: apply ``post_layernorm`` here. False (the default) leaves it to the Q-Former's ``ln_vision``.
        dtype: weights' dtype (BLIP-2 runs its frozen ViT in float16 on GPUs).
    """

    def __init__(
        self, name_or_path: str, frozen: bool = True, final_norm: bool = False, dtype: DType = "float32"
    ) -> None:
        super().__init__()
        path = resolve_name_or_path(name_or_path, "encoder.name_or_path")
        composite = blip2_config(path)
        if composite is not None:
            self.model = load_part(
                transformers.Blip2VisionModel, composite.vision_config, path, "vision_model.", dtype, "encoder"
            )
        else:
            try:
                self.model = transformers.Blip2VisionModel.from_pretrained(path, **dtype_kwarg(dtype))
            except (OSError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"encoder.name_or_path: cannot load {name_or_path!r}: {first}") from None
        self.final_norm = final_norm
        if not final_norm:  # the weights live on as the Q-Former's ln_vision (see the module docstring)
            self.model.post_layernorm = nn.Identity()
        self.image_size, self.mean, self.std = _preprocessing(path, self.model.config)
        self.frozen = frozen
        set_frozen(self.model, frozen, f"encoder {name_or_path}")

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def layer_norm_eps(self) -> float:
        """The epsilon of the tower's norms, which ``post_layernorm`` (the Q-Former's ``ln_vision``) shares."""
        return float(self.model.config.layer_norm_eps)

    def block_modules(self) -> list[nn.Module]:
        """The tower's encoder layers (``Blip2EncoderLayer``)."""
        return list(self.model.encoder.layers)

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """Bicubic resize to the square input size, then CLIP normalisation (as ``BlipImageProcessor``)."""
        return T.Compose(
            [
                T.Resize((self.image_size, self.image_size), interpolation=T.InterpolationMode.BICUBIC),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def train(self, mode: bool = True) -> HFBlip2Vision:
        super().train(mode and not self.frozen)  # a frozen tower stays in eval mode whatever Lightning asks
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen), own_precision(dtype, pixels.device):
            return as_autocast_leaves(self.model(pixel_values=pixels.to(dtype)).last_hidden_state)  # [B, 1 + N, D]


def _preprocessing(path: str, config: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)``: from ``preprocessor_config.json`` when the directory has one, else the model's
    ``image_size`` and OpenAI CLIP's statistics (BLIP-2's)."""
    size, mean, std = int(config.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    file = Path(path) / "preprocessor_config.json"
    if file.is_file():
        pre = json.loads(file.read_text())
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        if isinstance(pre.get("size"), dict) and "height" in pre["size"]:
            size = int(pre["size"]["height"])
    return size, mean, std
