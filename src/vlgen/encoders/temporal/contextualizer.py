"""EVLGen's soft attentive temporal contextualizer, inserted into every block of a frozen image encoder.

At each spatial position, a frame's token attends to the same position in every frame of its clip: queries and keys
are learned projections to ``hidden_dim`` (``num_heads`` heads), values are the raw features split into the same
heads, and the result is added back through a scalar gate initialised at zero, so the encoder starts as the image
model and only these weights learn (the image encoder stays frozen). As in the reference, logits are scaled by
``hidden_dim ** -0.5``, the module sits between attention and MLP of each ViT block, and the clip's tokens are
averaged over frames afterwards.

Nothing here tells frames apart but their content: attention across frames followed by the mean is invariant to the
order of the frames, so the paper's model cannot tell a clip from its reverse (left from right, appearing from
disappearing). ``frame_embedding: true`` adds a learned per-frame embedding to the queries' and keys' inputs (not
to the values), an extension that lets the attention read order; it is off by default.

Blocks are wrapped, never copied: a timm ViT or EVA block (``vision_transformer.Block``, ``eva.EvaBlock``) is run
through its own sub-modules with the temporal step between its two residual branches; any other block (a CNN stage's
bottleneck) gets the temporal step after it. Channels-first maps ``[B*T, C, h, w]`` are handled like token
sequences ``[B*T, h*w, C]``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block as VitBlock
from torch import Tensor, nn

from vlgen.encoders.temporal.base import ClipLength, TemporalModule
from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder

log = logging.getLogger(__name__)
Position = Literal["auto", "after_attention", "after_block"]


class TemporalAttention(nn.Module):
    """Gated attention across the frames of a clip at each token position.

    Args:
        dim: width of the tokens (channels of a map).
        hidden_dim: width of queries and keys, over all heads.
        num_heads: heads; must divide ``dim`` (values are the raw features) and ``hidden_dim``.
        max_frames: with a value, a learned ``[max_frames, dim]`` embedding is added to the query/key inputs.
    """

    def __init__(self, dim: int, hidden_dim: int = 256, num_heads: int = 8, max_frames: int | None = None) -> None:
        super().__init__()
        if dim % num_heads or hidden_dim % num_heads:
            raise ConfigError(
                f"encoder.temporal: num_heads {num_heads} must divide the width {dim}, hidden_dim {hidden_dim}"
            )
        self.num_heads, self.scale = num_heads, hidden_dim**-0.5
        self.query = nn.Linear(dim, hidden_dim)
        self.key = nn.Linear(dim, hidden_dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.frame_embed = nn.Parameter(torch.zeros(max_frames, dim)) if max_frames else None

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """``x [B*T, N, C]`` (or ``[B*T, C, h, w]``) -> the same shape, each token mixed with its position's frames."""
        maps = x.ndim == 4
        seq = x.flatten(2).transpose(1, 2) if maps else x  # [B*T, C, h, w] -> [B*T, h*w, C]
        bt, n, c = seq.shape
        t, h = num_frames, self.num_heads
        frames = seq.to(self.query.weight.dtype).reshape(bt // t, t, n, c).transpose(1, 2)  # [B, N, T, C]
        keyed = frames
        if self.frame_embed is not None:
            if t > len(self.frame_embed):
                raise ConfigError(f"encoder.temporal.max_frames is {len(self.frame_embed)}, but clips have {t} frames")
            keyed = frames + self.frame_embed[:t]
        q = self.query(keyed).unflatten(-1, (h, -1)).transpose(2, 3)  # [B, N, H, T, hidden/H]
        k = self.key(keyed).unflatten(-1, (h, -1)).transpose(2, 3)
        v = frames.unflatten(-1, (h, -1)).transpose(2, 3)  # [B, N, H, T, C/H]
        mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, N, H, T, C/H]
        mixed = mixed.transpose(2, 3).flatten(-2).transpose(1, 2).reshape(bt, n, c)  # -> [B*T, N, C]
        out = seq + (self.gate * mixed).to(seq.dtype)
        return out.transpose(1, 2).reshape(x.shape) if maps else out


class ContextualizedBlock(nn.Module):
    """An encoder block followed (or split) by a :class:`TemporalAttention` that reads the clip length in flight."""

    def __init__(self, block: nn.Module, temporal: TemporalAttention, clip_length: ClipLength, mid: bool) -> None:
        super().__init__()
        self.block, self.temporal, self.mid = block, temporal, mid
        self.clip_length = clip_length

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        t = self.clip_length.num_frames
        if not self.mid:
            return self.temporal(self.block(x, *args, **kwargs), t)
        b = self.block  # a pre-norm residual block's two branches, each as timm's own forward runs it
        x = x + b.drop_path1(_layer_scale(b, 1, b.attn(b.norm1(x), *args, **kwargs)))
        x = self.temporal(x, t)
        return x + b.drop_path2(_layer_scale(b, 2, b.mlp(b.norm2(x))))


def _layer_scale(block: nn.Module, branch: int, x: Tensor) -> Tensor:
    """A ViT block's ``ls1``/``ls2`` modules or an EVA block's ``gamma_1``/``gamma_2`` vectors (``None``: none)."""
    if isinstance(block, VitBlock):
        return getattr(block, f"ls{branch}")(x)
    gamma = getattr(block, f"gamma_{branch}")
    return x if gamma is None else gamma * x


class TemporalContextualizer(TemporalModule):
    """EVLGen's video encoder: temporal attention in every block of the image encoder, then the mean over frames.

    Args:
        hidden_dim: query/key width of each temporal attention (the paper: 256).
        num_heads: its heads (the paper: 8).
        position: ``after_attention`` (the paper's place; timm ViT and EVA blocks), ``after_block`` (any block), or
            ``auto`` (the first where possible, the second otherwise).
        frame_embedding: add a learned frame-position embedding to queries and keys (not in the paper; see above).
        max_frames: frames the embedding covers when ``frame_embedding`` is on.
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_heads: int = 8,
        position: Position = "auto",
        frame_embedding: bool = False,
        max_frames: int = 16,
    ) -> None:
        super().__init__()
        self.hidden_dim, self.num_heads, self.position = hidden_dim, num_heads, position
        self.max_frames = max_frames if frame_embedding else None

    def attach(self, encoder: VisualEncoder) -> None:
        model = getattr(encoder, "model", None)
        if model is None or not hasattr(model, "feature_info"):
            name = type(encoder).__name__
            raise ConfigError(f"encoder.temporal: TemporalContextualizer needs a timm encoder, got {name}")
        wrapped = 0
        for parent, name, block, dim in _encoder_blocks(model, getattr(encoder, "feature_stage", None)):
            splittable = type(block) in (VitBlock, EvaBlock)
            mid = self.position == "after_attention" or (self.position == "auto" and splittable)
            if mid and not splittable:
                raise ConfigError(
                    f"encoder.temporal.position: after_attention needs timm ViT or EVA blocks, not {name}"
                )
            temporal = TemporalAttention(dim, self.hidden_dim, self.num_heads, self.max_frames)
            temporal.to(next(block.parameters()).device)
            parent.register_module(name.rsplit(".", 1)[-1], ContextualizedBlock(block, temporal, self.clip_length, mid))
            wrapped += 1
        if not wrapped:
            raise ConfigError(f"encoder.temporal: found no blocks to contextualize in {type(model).__name__}")
        log.info("temporal contextualizer: %d blocks of %s, gate at 0", wrapped, type(model).__name__)

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)  # [B, T, N, D] -> [B, N, D]


def _encoder_blocks(model: nn.Module, upto_stage: int | None) -> list[tuple[nn.Module, str, nn.Module, int]]:
    """``(parent, dotted name, block, width)`` of every block the encoder runs up to the stage it reads.

    Blocks come from timm's ``feature_info``: an entry naming a container (a CNN stage) contributes its children, an
    entry naming a single module with weights (a ViT block) contributes itself, a parameter-free one (a stem's
    activation) nothing. Blocks after ``upto_stage`` would never run and are left alone; so are ViT blocks already
    removed (``drop_last_blocks``).
    """
    infos = list(model.feature_info)
    if upto_stage is not None:
        infos = infos[: upto_stage + 1]
    found = []
    for info in infos:
        name = info["module"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        children = list(module.named_children()) if isinstance(module, (nn.Sequential, nn.ModuleList)) else None
        if children is not None:
            found += [(module, f"{name}.{child}", block, int(info["num_chs"])) for child, block in children]
        elif any(True for _ in module.parameters()):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            found.append((parent, name, module, int(info["num_chs"])))
    return found
