"""Any timm model as a vlgen visual encoder.

The model is built with ``timm.create_model(name)``; weights come from timm's own pretrained mechanism
(``pretrained: true``, which reads the hub or timm's cache) or from a local file (``checkpoint_path``). The encoder
returns every output token of ``forward_features`` (class token included for ViTs), optionally dropping the last
blocks as BLIP-2 does with EVA ViT-g. By default it is frozen and kept in eval mode; ``frozen: false`` trains it.
With ``lora`` (:class:`~vlgen.lora.LoRA`) a frozen backbone gets trainable low-rank adapters (on a ViT's ``qkv``,
``proj``, ``fc1`` and ``fc2`` layers by default): the backbone stays frozen and in eval mode, the adapters train
(their dropout acts in training only) and are saved in checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder, set_frozen
from vlgen.loading import DType, EncoderRecipe, as_autocast_leaves, own_precision, torch_dtype
from vlgen.lora import LoRA, add_lora, set_adapters_training

log = logging.getLogger(__name__)


class TimmEncoder(VisualEncoder):
    """A timm backbone returning tokens ``[B, N, D]``.

    Args:
        name: any ``timm.create_model`` name, e.g. ``vit_base_patch16_224`` or ``eva_giant_patch14_224.clip_ft_in1k``.
        pretrained: load timm's pretrained weights for ``name``.
        checkpoint_path: a local weights file (``.pth``/``.safetensors``) loaded instead of timm's download.
        frozen: keep every parameter fixed and the module in eval mode.
        drop_last_blocks: remove this many final transformer blocks (BLIP-2 uses the second-to-last layer's output).
        final_norm: apply the model's final norm to the tokens (BLIP-2 with EVA keeps the raw features: false).
        model_kwargs: extra ``create_model`` arguments (``img_size``, ``patch_size``, ``depth`` ...).
        transform: overrides of the data config timm resolves for the model (``crop_pct``, ``mean``, ``std`` ...).
        train_augment: use timm's training augmentation (random resized crop and horizontal flip, which breaks
            captions that say "left of") for training batches instead of the evaluation transform.
        dtype: weights' dtype; ``float16`` / ``bfloat16`` halve the memory of a large frozen encoder (BLIP-2 keeps
            its ViT-g in fp16). Pixels are cast to it; tokens come out in it.
        init_seed: draw the random initial weights from this seed, whatever the global RNG state, so that separate
            runs (e.g. BLIP-2 stage 1 and stage 2) share one frozen random encoder. Ignored for pretrained weights.
        build_if_missing: a recipe that trains the freshly built model and writes ``checkpoint_path`` when that file
            does not exist (e.g. the tiny encoder the CPU configs pre-train on the synthetic world's pictures).
        feature_stage: take the tokens from this stage of ``model.feature_info`` (timm's ``forward_intermediates``
            index) instead of the final features: e.g. a CNN's stride-16 map, with four times the tokens of its
            stride-32 one. A ViT's prefix tokens are then left out.
        lora: LoRA adapters on the frozen backbone (:class:`~vlgen.lora.LoRA`; ``all-linear`` adapts every linear
            layer, which a CNN has none of: name its convolutions in ``target_modules``); needs ``frozen: true`` and
            the peft package.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        frozen: bool = True,
        drop_last_blocks: int = 0,
        final_norm: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        transform: dict[str, Any] | None = None,
        train_augment: bool = False,
        dtype: DType = "float32",
        init_seed: int | None = None,
        build_if_missing: EncoderRecipe | None = None,
        feature_stage: int | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        if lora is not None:
            lora.check("encoder.lora", frozen)  # before any weight is loaded
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        self.transform_overrides = dict(transform or {})
        self.train_augment = train_augment
        build = None
        if checkpoint_path is not None:
            if Path(checkpoint_path).is_file():
                kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
                pretrained = True
            elif build_if_missing is None:
                raise ConfigError(f"encoder.checkpoint_path: {checkpoint_path} does not exist")
            else:
                build = build_if_missing
        try:
            with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
                if init_seed is not None:
                    torch.manual_seed(init_seed)
                self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ConfigError(f"encoder.name: timm has no model called {name!r}") from None
            raise
        self.feature_stage = feature_stage
        if feature_stage is not None:
            stages = len(self.model.feature_info)
            if not 0 <= feature_stage < stages:
                raise ConfigError(f"encoder.feature_stage must be in 0..{stages - 1} for {name}, got {feature_stage}")
        if build is not None and checkpoint_path is not None:  # train the random model, then read it back
            log.info("encoder.checkpoint_path: %s is missing; building it with %r", checkpoint_path, build)
            build.build(self, Path(checkpoint_path))
            self.model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
        if drop_last_blocks:
            blocks = self.model.blocks
            self.model.blocks = nn.Sequential(*list(blocks)[: len(blocks) - drop_last_blocks])
        if not final_norm and hasattr(self.model, "norm"):
            self.model.norm = nn.Identity()
        self.model.to(torch_dtype(dtype))
        self.frozen = frozen
        self.lora = lora
        if lora is None:
            set_frozen(self.model, frozen, f"encoder {name}")
        else:
            add_lora(self.model, lora, "encoder.lora", f"encoder {name}")

    @property
    def embed_dim(self) -> int:
        if self.feature_stage is not None:
            return int(self.model.feature_info[self.feature_stage]["num_chs"])
        return int(self.model.num_features)

    def block_modules(self) -> list[nn.Module]:
        """The blocks timm's ``feature_info`` names up to the stage read: a ViT's or EVA's ``blocks.N``, a CNN stage's
        residual blocks (with a temporal contextualizer, the blocks that wrap them)."""
        from vlgen.encoders.temporal.contextualizer import _encoder_blocks

        if not hasattr(self.model, "feature_info"):
            return []
        return [block for _, _, block, _ in _encoder_blocks(self.model, self.feature_stage)]

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        config = timm.data.resolve_data_config({}, model=self.model)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # the model may be built at another size than its pretrained config says
            config["input_size"] = (3, *img_size)
        config.update(self.transform_overrides)
        return timm.data.create_transform(**config, is_training=train and self.train_augment)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the backbone's weights have now (the configured one, or a strategy's cast); pixels go in so."""
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> TimmEncoder:
        # A frozen encoder stays in eval mode whatever Lightning asks (dropout, drop-path and norm statistics off).
        super().train(mode and not self.frozen)
        if self.lora is not None:  # ... but its adapters (their dropout) follow `mode`
            set_adapters_training(self.model, mode)
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        # A frozen backbone needs no graph unless modules inserted into it train (a video encoder's temporal ones).
        needs_grad = not self.frozen or any(p.requires_grad for p in self.model.parameters())
        grad = torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad)
        with grad, own_precision(self.dtype, pixels.device):
            if self.feature_stage is None:
                tokens = self.model.forward_features(pixels.to(self.dtype))  # [B, N, D] ViTs, [B, D, h, w] CNNs
            else:  # [B, D, h, w] for CNNs and ViTs alike (a ViT's prefix tokens left out); later stages not run
                kwargs = {"indices": [self.feature_stage], "intermediates_only": True, "stop_early": True}
                tokens = self.model.forward_intermediates(pixels.to(self.dtype), **kwargs)[0]
        if tokens.ndim == 4:
            tokens = tokens.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        return as_autocast_leaves(tokens)
