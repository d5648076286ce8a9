"""The small contracts every vlgen component meets.

Data flows one way: pixels -> ``VisualEncoder`` (tokens ``[B, N, Dv]``) -> ``Bridge`` (prompts ``[B, M, Dllm]`` plus
auxiliary losses) -> ``LanguageModel`` (loss on caption tokens, or generated text). Encoders, bridges and language
models know nothing of Lightning or of each other; the LightningModules in ``vlgen.models`` only see these
interfaces. Batches are TypedDicts so every key a model reads is named here.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, runtime_checkable

import torch
from PIL import Image
from torch import Tensor, nn

log = logging.getLogger(__name__)


class _PerSampleText(TypedDict, total=False):
    prompts: list[str]
    targets: list[list[str]]
    target_weights: list[list[float]]
    answer_types: list[str]
    question_types: list[str]


class CaptionBatch(_PerSampleText):
    """What image-text and video-text data modules yield.

    Attributes:
        pixels: ``[B, C, H, W]`` images or ``[B, T, C, H, W]`` video frames, already transformed.
        captions: one training target per sample (at evaluation the first reference).
        references: every reference caption of each sample (for metrics).
        ids: a stable identifier per sample (image or video id).
        num_skipped: samples dropped from this batch because their file or text was unreadable.
        prompts: optional; per-sample text the LLM reads after the visual prompts and before the target (a VQA
            question, an instruction), formatted by the model's ``prompt_template``. Absent: the model's ``prompt``.
        targets: optional, training; several targets per sample, each weighted by ``target_weights`` (a VQA
            question's distinct answers and their share of the annotators). Absent: ``captions``, weight 1.
        answer_types, question_types: optional, evaluation; each question's types (VQAv2's ``yes/no`` ...), for
            per-type accuracy.
    """

    pixels: Tensor
    captions: list[str]
    references: list[list[str]]
    ids: list[str]
    num_skipped: int


class TextBatch(TypedDict):
    """What text-only data modules yield."""

    text: list[str]
    num_skipped: int


@dataclass
class BridgeOutput:
    """Prompts for the language model plus whatever auxiliary losses the bridge computed.

    Attributes:
        prompts: ``[B, M, Dllm]`` soft prompts, prepended to the language model's input.
        mask: ``[B, M]`` with 1 for real prompts (``None`` means all real).
        losses: named scalar losses the bridge adds to the training objective (already weighted).
        pooled: ``[B, H]`` one feature per sample for objectives against the caption (``H`` is the bridge's
            :attr:`Bridge.pooled_dim`).
    """

    prompts: Tensor
    mask: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    pooled: Tensor | None = None


class HasBlocks(nn.Module):
    """A module that names its repeated blocks (transformer layers, a CNN's residual blocks): the units vlgen shards
    with FSDP2 and activation-checkpoints (:mod:`vlgen.sharding`). Encoders, bridges, language models, the P-Former and
    objectives are ``HasBlocks``; most components with blocks say them in one line."""

    def block_modules(self) -> list[nn.Module]:
        """The blocks, each a submodule that the component runs by calling it (``block(x)``, so the hooks that gather
        its shards run) and whose weights are used nowhere else. None by default: the component's weights then stay
        with the model's outer unit (projectors, a few layers of glue)."""
        return []


def no_split_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a Hugging Face model: the outermost submodules of the classes its ``_no_split_modules`` names
    (``LlamaDecoderLayer``, ``OPTDecoderLayer``, ``T5Block``, ``BertLayer`` ...), as Accelerate's FSDP wrapping uses
    them; none for a model that names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in names and not any(name.startswith(p + ".") for p in inside):
            found.append(module)
            inside.append(name)
    return found


class VisualEncoder(HasBlocks, ABC):
    """Images ``[B, C, H, W]`` (a video encoder: frames ``[B, T, C, H, W]``) -> visual tokens ``[B, N, D]``."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Width ``D`` of the tokens this encoder returns."""

    @abstractmethod
    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        """PIL image -> normalised tensor ``[C, H, W]`` as this encoder expects it."""

    @abstractmethod
    def forward(self, pixels: Tensor) -> Tensor: ...


class Bridge(HasBlocks, ABC):
    """Visual tokens -> language-model prompts.

    A bridge is constructed from its own hyper-parameters only; the widths on either side are derived by the model
    that owns it, which calls :meth:`build` once with the encoder's ``embed_dim`` and the LLM's ``hidden_size``.
    """

    @abstractmethod
    def build(self, vision_dim: int, llm_dim: int) -> None:
        """Create the layers that depend on the widths of the encoder and the language model."""

    @abstractmethod
    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> BridgeOutput:
        """``tokens [B, N, Dv]`` (``mask [B, N]``) -> :class:`BridgeOutput` with ``prompts [B, M, Dllm]``."""

    def prompt_count(self, num_tokens: int) -> int:
        """Prompts per sample for ``num_tokens`` visual tokens once built: one per token by default (projectors);
        bridges with learned queries or token merging say their own."""
        return num_tokens

    @property
    def pooled_dim(self) -> int | None:
        """Width of ``BridgeOutput.pooled``; ``None`` when the bridge returns no pooled feature."""
        return None


class LanguageModel(HasBlocks, ABC):
    """A (usually frozen) language model that reads soft prompts followed by text."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the input embeddings, which the bridge must produce."""

    @abstractmethod
    def loss(
        self,
        prompts: Tensor,
        prompt_mask: Tensor | None,
        prefixes: list[str],
        targets: list[str],
        weights: Tensor | None = None,
    ) -> Tensor:
        """Mean cross-entropy over the target tokens only, given ``[prompts][prefix text]`` as context; with
        ``weights [B]``, the weighted mean over samples of each sample's mean token cross-entropy."""

    @abstractmethod
    def generate(
        self, prompts: Tensor, prompt_mask: Tensor | None, prefixes: list[str], decoding: Any = None
    ) -> list[str]:
        """Decode one string per sample after ``[prompts][prefix text]``, with ``decoding`` (a
        :class:`~vlgen.llms.Decoding`) in place of the model's own settings when given."""

    @abstractmethod
    def embed_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """The input embeddings ``[B, T, D]`` of each text's tokens (no special tokens) and their mask ``[B, T]``."""


# --- what callbacks and data modules look for, declared ------------------------------------------------------------
@runtime_checkable
class MergingBridge(Protocol):
    """A bridge whose token merging can be ramped up (:class:`~vlgen.callbacks.MergeRamp` sets the fraction of
    its full merge schedule applied, 0 to 1)."""

    merge_fraction: float


@runtime_checkable
class ProvidesImageTransform(Protocol):
    """A model that tells data modules how to turn a PIL image into its encoder's input."""

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]: ...


@runtime_checkable
class ReadsText(Protocol):
    """A bridge that can also read each sample's text (a question, an instruction) beside the visual tokens, as
    BLIP-2's VQA fine-tuning and InstructBLIP's instruction-aware Q-Former do."""

    def forward_with_text(self, tokens: Tensor, mask: Tensor | None, texts: list[str]) -> BridgeOutput: ...


@runtime_checkable
class EvaluationTask(Protocol):
    """What a data module's task (:class:`~vlgen.data.VQATask`) tells the model about evaluating its splits: the
    metric, the decoding settings (``None``: the LLM's own) and the official results file."""

    decoding: Any

    def make_metric(self) -> Any: ...

    def submission(self, rows: list[dict[str, Any]]) -> tuple[str, Any]: ...


@runtime_checkable
class ScoresSamples(Protocol):
    """A metric that also scores each sample on its own (``gallery.html``'s score column): one number per
    prediction, computed over the whole set passed (CIDEr-D's document frequencies), named ``sample_score_name``."""

    sample_score_name: str

    def sample_scores(self, preds: list[str], refs: list[list[str]]) -> list[float]: ...


@runtime_checkable
class LogsSamples(Protocol):
    """A model that keeps a few validation samples (``pixels``, ``caption``, ``references``, ``id``) for tables."""

    logged_samples: list[dict[str, Any]]


def prompt_count(encoder: VisualEncoder, bridge: Bridge) -> int:
    """Prompts per image a built ``bridge`` gives after ``encoder``: the encoder's token count, measured once on a
    blank image through its own evaluation transform, as the bridge maps it (:meth:`Bridge.prompt_count`)."""
    pixels = encoder.image_transform(False)(Image.new("RGB", (224, 224)))[None]  # [1, C, H, W]
    with torch.no_grad():
        num_tokens = int(encoder(pixels).shape[1])
    return bridge.prompt_count(num_tokens)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, frozen)`` parameter counts of ``module``."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def freeze(module: nn.Module) -> None:
    """Stop gradients into ``module`` and put it in eval mode (dropout off)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def set_frozen(module: nn.Module, frozen: bool, name: str) -> None:
    """Freeze ``module`` when ``frozen``, then log its trainable and frozen parameter counts once under ``name``."""
    if frozen:
        freeze(module)
    trainable, fixed = count_parameters(module)
    log.info("%s: %s trainable, %s frozen parameters", name, f"{trainable:,}", f"{fixed:,}")


def all_real(mask: Tensor | None, like: Tensor) -> Tensor:
    """``mask`` or, when it is ``None``, an all-ones ``[B, N]`` mask for ``like [B, N, ...]``."""
    if mask is not None:
        return mask
    return torch.ones(like.shape[:2], dtype=torch.long, device=like.device)


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, T, H]`` over the positions where ``mask [B, T]`` is 1 -> ``[B, H]``."""
    real = mask[..., None].to(hidden.dtype)  # [B, T, 1]
    return (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
