"""Contrastive objectives between one pooled visual feature per sample and a text feature of its caption.

:func:`itc_loss` is the symmetric InfoNCE that BLIP-2's ITC, P-Former's self-contrast and these objectives share:
cross-entropy of each row's similarities to every column of the global batch (gathered across ranks with
gradients, :mod:`vlgen.dist`), the matching column at this rank's offset, with label smoothing. A
:class:`PooledContrast` reads the bridge's pooled feature (``BridgeOutput.pooled``, whose width the bridge declares
as ``pooled_dim``), or, for a bridge that declares none, the mean of its real prompts; both sides are projected to
``embed_dim`` and normalised, with a learned temperature. Subclasses only say where the text feature comes from:

* :class:`SentenceContrast`: a frozen sentence encoder's mean-pooled embedding (EVLGen's beta term).
* :class:`ImageTextContrast`: the frozen LLM's own input embeddings of the caption tokens, averaged, so no second
  text model is loaded (a cheap ITC term for any bridge).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from vlgen.dist import gather_with_grad, rank
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput, CaptionBatch, LanguageModel, all_real, masked_mean, no_split_blocks
from vlgen.loading import load_pretrained
from vlgen.objectives.base import ModelParts, Objective


def itc_loss(sim_a2b: Tensor, sim_b2a: Tensor, offset: int, label_smoothing: float = 0.1) -> Tensor:
    """Symmetric InfoNCE from ``[B, M]`` similarities (already divided by the temperature): sample ``b`` of this
    rank matches column ``offset + b`` in both directions (BLIP-2 / LAVIS smooth the labels by 0.1)."""
    targets = torch.arange(sim_a2b.shape[0], device=sim_a2b.device) + offset
    a2b = F.cross_entropy(sim_a2b, targets, label_smoothing=label_smoothing)
    b2a = F.cross_entropy(sim_b2a, targets, label_smoothing=label_smoothing)
    return (a2b + b2a) / 2


class PooledContrast(Objective):
    """InfoNCE between the projected pooled visual feature and the projected text feature of the caption.

    Args:
        weight: the loss weight.
        embed_dim: width of the shared embedding space.
        temperature: initial temperature (learned, kept within [0.001, 0.5]).
        label_smoothing: label smoothing of both cross-entropies.
    """

    def __init__(self, weight: float, embed_dim: int, temperature: float, label_smoothing: float) -> None:
        super().__init__(weight)
        self.embed_dim, self.label_smoothing = embed_dim, label_smoothing
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.vision_proj: nn.Module | None = None
        self.text_proj: nn.Module | None = None
        self._from_prompts = False

    @abstractmethod
    def text_width(self, parts: ModelParts) -> int:
        """Width of :meth:`text_features`."""

    @abstractmethod
    def text_features(self, captions: list[str], parts: ModelParts) -> Tensor:
        """One feature ``[B, Dt]`` per caption, without gradient into frozen text models."""

    def build(self, parts: ModelParts) -> None:
        width = parts.bridge.pooled_dim
        if width is None:  # no pooled feature: the mean of the prompts, in the LLM's width
            if parts.llm is None:
                raise ConfigError(
                    f"model.objectives: {self.name}: {type(parts.bridge).__name__} gives no pooled feature and the "
                    "model has no LLM whose width its prompts would have"
                )
            width, self._from_prompts = parts.llm.hidden_size, True
        self.vision_proj = nn.Linear(width, self.embed_dim)
        self.text_proj = nn.Linear(self.text_width(parts), self.embed_dim)

    def pooled(self, out: BridgeOutput) -> Tensor:
        """The visual feature ``[B, H]`` this objective contrasts."""
        if self._from_prompts:
            return masked_mean(out.prompts, all_real(out.mask, out.prompts))  # [B, M, D] -> [B, D]
        if out.pooled is None:
            raise ValueError(f"{self.name}: the bridge declared a pooled_dim but returned no pooled feature")
        return out.pooled

    def loss(self, out: BridgeOutput, batch: CaptionBatch, parts: ModelParts) -> Tensor:
        assert self.vision_proj is not None and self.text_proj is not None, f"{type(self).__name__}.build not called"
        captions = batch["captions"]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image = F.normalize(self.vision_proj(self.pooled(out).float()), dim=-1)  # [B, E]
        text = F.normalize(self.text_proj(self.text_features(captions, parts).float()), dim=-1)  # [B, E]
        sim_i2t = image @ gather_with_grad(text).T / self.temp  # [B, M]
        sim_t2i = text @ gather_with_grad(image).T / self.temp  # [B, M]
        return itc_loss(sim_i2t, sim_t2i, offset=rank() * len(captions), label_smoothing=self.label_smoothing)


class SentenceContrast(PooledContrast):
    """EVLGen's optional contrastive term (the paper's beta): the pooled feature against a frozen sentence
    encoder's mean-pooled embedding of the caption. Logged as ``train/contrastive``.

    Args:
        encoder: the sentence encoder (hub id, local directory or ``pkg:NAME``), e.g. all-MiniLM-L6-v2.
        weight: the loss weight.
        embed_dim: width of the shared embedding space.
        max_length: captions are truncated to this many tokens.
        temperature: initial temperature (learned).
        label_smoothing: label smoothing of the cross-entropies.
    """

    name = "contrastive"

    def __init__(
        self,
        encoder: str,
        weight: float = 0.1,
        embed_dim: int = 256,
        max_length: int = 32,
        temperature: float = 0.07,
        label_smoothing: float = 0.1,
    ) -> None:
        super().__init__(weight, embed_dim, temperature, label_smoothing)
        option = "objectives.SentenceContrast.encoder"  # errors name ...encoder.name_or_path
        self.encoder, self.tokenizer = load_pretrained(transformers.AutoModel, encoder, None, "float32", option)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.max_length = max_length

    def block_modules(self) -> list[nn.Module]:
        """The frozen sentence encoder's blocks (its ``_no_split_modules``)."""
        return no_split_blocks(self.encoder)

    def train(self, mode: bool = True) -> SentenceContrast:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout stays off
        return self

    def text_width(self, parts: ModelParts) -> int:
        return int(self.encoder.config.hidden_size)

    @torch.no_grad()
    def text_features(self, captions: list[str], parts: ModelParts) -> Tensor:
        device = self.temp.device
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = enc.to(device)
        return masked_mean(self.encoder(**enc).last_hidden_state, enc["attention_mask"])  # [B, T, H] -> [B, H]


class ImageTextContrast(PooledContrast):
    """Image-text contrast against the frozen LLM's own view of the caption: the mean of its input embeddings over
    the caption's tokens (a bag-of-words feature that costs one embedding lookup). Logged as ``train/itc``.

    Args:
        weight: the loss weight.
        embed_dim: width of the shared embedding space.
        temperature: initial temperature (learned).
        label_smoothing: label smoothing of the cross-entropies.
    """

    name = "itc"

    def __init__(
        self, weight: float = 0.1, embed_dim: int = 256, temperature: float = 0.07, label_smoothing: float = 0.1
    ) -> None:
        super().__init__(weight, embed_dim, temperature, label_smoothing)

    def _llm(self, parts: ModelParts) -> LanguageModel:
        if parts.llm is None:
            raise ConfigError(f"model.objectives: {self.name} reads the LLM's embeddings, and this model has no LLM")
        return parts.llm

    def text_width(self, parts: ModelParts) -> int:
        return self._llm(parts).hidden_size

    @torch.no_grad()
    def text_features(self, captions: list[str], parts: ModelParts) -> Tensor:
        embeddings, mask = self._llm(parts).embed_text(captions)  # [B, T, D], [B, T]
        return masked_mean(embeddings.float(), mask)  # [B, D]
