"""P-Former stage 0 (arXiv 2307.07063): learn, from sentences alone, the prompts that make a frozen LLM say them.

Three objectives, each weighted in the config and logged (a weight of 0 skips that loss). LM reconstruction: the
frozen LLM, given only the P-Former's prompts of a sentence, is trained (through the prompts) to produce that
sentence; the LLM's end-of-sequence token closes the target, where the reference appends "\\n" because its OPT
decoding stops there. Self-contrastive: two views of each sentence, each with 25% of its real non-special tokens
replaced by [MASK], go through the encoder; their sentence embeddings, projected to 256-d and normalised, must find
each other among the batch (gathered across ranks) under InfoNCE with label smoothing 0.1 at temperature 0.07, both
directions. (The reference contrasts one masked view with itself; the paper describes two views, done here.) The
prompts for the other losses come from the unmasked sentence. Vector quantisation: MSE between each prompt and its
nearest vocabulary embedding of the frozen LLM (the target detached). Validation reports the same losses (with masks
drawn from a fixed seed) and ``val/exact_match``: the share of held-out sentences that greedy decoding from the
prompts alone reproduces, compared lower-cased with punctuation split off and whitespace normalised.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vlgen.bridges.pformer import PFormer
from vlgen.dist import gather_with_grad, rank
from vlgen.errors import ConfigError
from vlgen.interfaces import LanguageModel, TextBatch
from vlgen.models.base import Optim, VLModule
from vlgen.objectives import itc_loss


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_ids: Tensor,
    mask_id: int,
    prob: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A copy of ``input_ids [B, T]`` where each real (``attention_mask`` 1), non-special token is replaced by
    ``mask_id`` with probability ``prob``."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    draw = torch.rand(input_ids.shape, generator=generator).to(input_ids.device) < prob
    return input_ids.masked_fill(maskable & draw, mask_id)


def self_contrastive_loss(
    a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, temperature: float, label_smoothing: float, offset: int = 0
) -> Tensor:
    """Symmetric InfoNCE between two views ``a, b [B, E]`` (normalised) of the same sentences; ``a_all, b_all
    [M, E]`` are the views of the whole (gathered) batch, where this rank's rows start at ``offset``."""
    a2b = a @ b_all.t() / temperature  # [B, M]
    b2a = b @ a_all.t() / temperature  # [B, M]
    return itc_loss(a2b, b2a, offset, label_smoothing)


def vq_loss(prompts: Tensor, vocab: Tensor, chunk: int = 4096) -> Tensor:
    """MSE between each prompt of ``prompts [B, P, D]`` and its nearest (L2) row of ``vocab [V, D]`` (detached)."""
    flat = prompts.reshape(-1, prompts.shape[-1]).float()  # [B*P, D]
    table = vocab.detach().float()
    with torch.no_grad():  # [B*P, V] distances, a chunk of rows at a time
        nearest = torch.cat([torch.cdist(rows, table).argmin(dim=1) for rows in flat.split(chunk)])
    return F.mse_loss(flat, table[nearest])


def normalise(text: str) -> str:
    """Lower case, punctuation as separate words, single spaces (decoders may space punctuation differently)."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


class PFormerStage0(VLModule):
    """Text-only training of a :class:`~vlgen.bridges.PFormer` against a frozen LLM.

    Args:
        pformer: the P-Former to train (``frozen: false``); its prompts get the LLM's width.
        llm: the frozen language model that must reconstruct each sentence from the prompts alone.
        lm_weight: weight of the reconstruction loss.
        contrastive_weight: weight of the self-contrastive loss.
        vq_weight: weight of the vocabulary quantisation loss (0: off).
        embed_dim: width of the contrastive projection.
        mask_prob: share of tokens masked in each contrastive view.
        temperature: contrastive temperature.
        label_smoothing: label smoothing of the contrastive cross-entropy.
        num_logged_samples: reconstructions of the first validation batch printed after each validation.
        optim: optimiser and schedule.
        nonfinite: what a non-finite training loss or gradient does: ``stop`` the run (one line naming the step and
            the terms) or ``skip`` the step (:class:`~vlgen.models.VLModule`).
        activation_checkpointing: recompute the activations of the components' blocks in the backward instead of
            keeping them: ``true`` for all, or the components by name, e.g. ``[llm]`` (:class:`~vlgen.models.VLModule`).
    """

    def __init__(
        self,
        pformer: PFormer,
        llm: LanguageModel,
        lm_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        vq_weight: float = 1.0,
        embed_dim: int = 256,
        mask_prob: float = 0.25,
        temperature: float = 0.07,
        label_smoothing: float = 0.1,
        num_logged_samples: int = 4,
        optim: Optim | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        activation_checkpointing: bool | list[str] = False,
    ) -> None:
        super().__init__(optim, nonfinite=nonfinite, activation_checkpointing=activation_checkpointing)
        if pformer.frozen:
            raise ConfigError("model.pformer.frozen must be false in stage 0: the P-Former is what trains")
        if not 0.0 <= mask_prob < 1.0:
            raise ConfigError(f"model.mask_prob must be in [0, 1), got {mask_prob}")
        if contrastive_weight and pformer.tokenizer.mask_token_id is None:
            raise ConfigError("model.contrastive_weight: the P-Former's tokenizer has no mask token; set it to 0")
        self.pformer, self.llm = pformer, llm
        pformer.build(llm.hidden_size)
        self.text_proj = nn.Linear(pformer.hidden_size, embed_dim)
        self.loss_weights = {"lm": lm_weight, "contrastive": contrastive_weight, "vq": vq_weight}
        self.mask_prob, self.temperature, self.label_smoothing = mask_prob, temperature, label_smoothing
        self.num_logged_samples = num_logged_samples
        special = torch.tensor(sorted(pformer.tokenizer.all_special_ids), dtype=torch.long)
        self.register_buffer("special_ids", special, persistent=False)
        self._samples: list[tuple[str, str]] = []
        self.log_parameter_counts()

    def forward(self, texts: list[str]) -> Tensor:
        """The P-Former's prompts ``[B, P, Dllm]``."""
        return self.pformer(texts)

    def reconstruct(self, texts: list[str]) -> list[str]:
        """What the LLM generates from each sentence's prompts alone."""
        return self.llm.generate(self(texts), None, [""] * len(texts))

    def vocabulary(self) -> Tensor:
        """The frozen LLM's input embedding table ``[V, Dllm]``."""
        model = getattr(self.llm, "model", None)
        if model is None or not hasattr(model, "get_input_embeddings"):
            raise ConfigError("model.vq_weight: the LLM exposes no input embeddings (.model); set vq_weight to 0")
        return model.get_input_embeddings().weight

    # --- losses ---------------------------------------------------------------------------------------------------
    def compute_losses(self, texts: list[str], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Unweighted ``lm``, ``contrastive`` and ``vq`` losses of ``texts`` (those with a non-zero weight)."""
        ids, att = self.pformer.tokenize(texts)  # [B, T]
        losses: dict[str, Tensor] = {}
        weights = self.loss_weights
        if weights["lm"] or weights["vq"]:
            prompts = self.pformer.to_prompts(self.pformer.sentence_features(ids, att))  # [B, P, Dllm]
            if weights["lm"]:
                losses["lm"] = self.llm.loss(prompts, None, [""] * len(texts), texts)
            if weights["vq"]:
                losses["vq"] = vq_loss(prompts, self.vocabulary())
        if weights["contrastive"]:
            mask_id = int(self.pformer.tokenizer.mask_token_id)
            views = [mask_tokens(ids, att, self.special_ids, mask_id, self.mask_prob, generator) for _ in range(2)]
            a, b = (F.normalize(self.text_proj(self.pformer.sentence_features(v, att)), dim=-1) for v in views)
            losses["contrastive"] = self_contrastive_loss(
                a, b, gather_with_grad(a), gather_with_grad(b), self.temperature, self.label_smoothing, rank() * len(a)
            )
        return losses

    def _total(self, losses: dict[str, Tensor]) -> Tensor:
        return sum((self.loss_weight(k) * v for k, v in losses.items()), torch.zeros((), device=self.device))

    # --- training -------------------------------------------------------------------------------------------------
    def training_losses(self, batch: TextBatch) -> dict[str, Tensor]:
        return self.compute_losses(batch["text"])

    # --- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: TextBatch, batch_idx: int) -> None:
        if self.count_skipped(batch, "val"):  # type: ignore[arg-type]
            return
        texts, size = batch["text"], len(batch["text"])
        losses = self.compute_losses(texts, torch.Generator().manual_seed(batch_idx))  # the same masks every time
        logged: dict[str, Any] = {f"val/{k}": v for k, v in losses.items()}
        logged["val/loss"] = self._total(losses)
        preds = self.reconstruct(texts)
        hits = [normalise(p) == normalise(t) for p, t in zip(preds, texts, strict=True)]
        logged["val/exact_match"] = sum(hits) / size
        self.log_dict(logged, batch_size=size, sync_dist=True)
        if batch_idx == 0:
            self._samples = list(zip(texts, preds))[: self.num_logged_samples]

    def on_validation_epoch_end(self) -> None:
        if self._samples and not (self._trainer is not None and self.trainer.sanity_checking):
            rank_zero_info("P-Former reconstructions:\n" + "\n".join(f"  {t!r} -> {p!r}" for t, p in self._samples))
        self._samples = []
        self.report_skipped("val")
