"""BLIP-2 stage 1: the Q-Former learns to read a frozen image encoder, with no language model.

Three objectives of the BLIP-2 paper share the Q-Former. Image-text contrastive (ITC): query outputs and the text
[CLS] output are projected and normalised, the image-text similarity is the best query's, negatives are the batch
gathered across ranks with gradients, with a learned temperature. Image-text matching (ITM): a binary classifier on
the query outputs of a bidirectional pass over (image, text) pairs, with one hard negative text per image and one
hard negative image per text sampled from the ITC similarities. Image-grounded text generation (ITG): the caption
decoded from [DEC] under the multimodal causal mask. Validation reports retrieval recall from the ITC similarities.
Stage 2 (:class:`~vlgen.models.Captioner` with a :class:`~vlgen.bridges.QFormer` bridge) starts from this module's
checkpoint with ``QFormer(init_from=...)``: only the ``qformer.`` weights carry over.

Objectives listed under ``objectives`` read the Q-Former's output as a bridge's: prompts are the query outputs
projected to the LLM width, pooled is their mean. P-Former alignment (:class:`~vlgen.objectives.PromptAlignment`,
arXiv 2307.07063) adds ``weight * MSE`` between those prompts and a frozen P-Former's prompts of the caption. As in
the reference (BLIText's stage-1 model), the projection is created here with the width an objective names (the
P-Former's stage-0 checkpoint: no LLM is loaded), is trained by the alignment loss alone, and is saved in the
checkpoint as ``qformer.language_projection.*``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlgen.bridges.qformer import QFormer
from vlgen.dist import gather_no_grad, gather_objects, gather_with_grad, rank, world_size
from vlgen.errors import ConfigError
from vlgen.interfaces import CaptionBatch, VisualEncoder, masked_mean
from vlgen.models.base import Optim, VLModule
from vlgen.models.blip2_losses import (
    itc_similarities,
    itg_loss,
    itg_targets,
    itm_labels,
    positive_mask,
    retrieval_recall,
    sample_negatives,
)
from vlgen.objectives import ModelParts, Objective, itc_loss

log = logging.getLogger(__name__)


class Blip2Stage1(VLModule):
    """BLIP-2 representation learning: ITC + ITM + ITG on a Q-Former over a (frozen) visual encoder.

    Args:
        encoder: the visual encoder; its ``embed_dim`` sizes the Q-Former's cross-attention.
        qformer: the Q-Former, built with ``text_input: true`` (all three objectives read text).
        embed_dim: width of the contrastive projections.
        max_text_len: captions are truncated and padded to this many tokens.
        itc_weight: weight of the contrastive loss.
        itm_weight: weight of the matching loss.
        itg_weight: weight of the captioning loss.
        temperature: initial contrastive temperature (learned, kept within [0.001, 0.5]).
        text_pooling: the text's contrastive feature: its ``cls`` output (BLIP-2, for BERT initialisations) or the
            ``mean`` of its token outputs (for sentence encoders trained with mean pooling, such as MiniLM, whose
            [CLS] output barely differs between sentences, so ITC starts from collapsed text features).
        optim: optimiser and schedule.
        objectives: auxiliary objectives on the query outputs (e.g. :class:`~vlgen.objectives.PromptAlignment`,
            logged as ``align``); the first that names an LLM width sizes the projection to it.
        nonfinite: what a non-finite training loss or gradient does: ``stop`` the run (one line naming the step, the
            terms and the samples) or ``skip`` the step (:class:`~vlgen.models.VLModule`).
        activation_checkpointing: recompute the activations of the components' blocks in the backward instead of
            keeping them: ``true`` for all, or the components by name, e.g. ``[llm]`` (:class:`~vlgen.models.VLModule`).
    """

    def __init__(
        self,
        encoder: VisualEncoder,
        qformer: QFormer,
        embed_dim: int = 256,
        max_text_len: int = 32,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        temperature: float = 0.07,
        text_pooling: Literal["cls", "mean"] = "cls",
        optim: Optim | None = None,
        objectives: list[Objective] | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        activation_checkpointing: bool | list[str] = False,
    ) -> None:
        super().__init__(optim, objectives, nonfinite, activation_checkpointing)
        if qformer.tokenizer is None:
            raise ConfigError("model.qformer.text_input must be true for BLIP-2 stage 1 (ITC, ITM and ITG read text)")
        if max_text_len > qformer.config.max_position_embeddings:
            raise ConfigError(
                f"model.max_text_len ({max_text_len}) exceeds the Q-Former's "
                f"max_position_embeddings ({qformer.config.max_position_embeddings})"
            )
        self.encoder = encoder
        self.qformer = qformer
        # No LLM in stage 1: a projection to the LLM width only for an objective that names one (alignment: the
        # width of its stage-0 checkpoint).
        llm_dim = next((w for w in (o.llm_width() for o in self.objectives) if w is not None), None)
        qformer.build(encoder.embed_dim, llm_dim)
        self.build_objectives(ModelParts(encoder, qformer, None))
        hidden = qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.max_text_len = max_text_len
        self.text_pooling = text_pooling
        self.loss_weights = {"itc": itc_weight, "itm": itm_weight, "itg": itg_weight}
        self._val: list[dict[str, Any]] = []
        self.log_parameter_counts()

    def image_transform(self, train: bool) -> Any:
        """The transform the data module applies to each PIL image (the encoder's own)."""
        return self.encoder.image_transform(train)

    # --- embeddings -----------------------------------------------------------------------------------------------
    def image_embeddings(self, pixels: Tensor) -> Tensor:
        """Normalised contrastive query embeddings ``[B, Q, embed_dim]``."""
        return self._image_feats(self.qformer.query_features(self.encoder(pixels)))

    def text_embeddings(self, texts: list[str]) -> Tensor:
        """Normalised contrastive text embeddings ``[B, embed_dim]``."""
        return self._text_feat(*self.qformer.tokenize(texts, self.max_text_len, pad_to_max=False))

    forward = image_embeddings

    def _image_feats(self, queries: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(queries), dim=-1)  # [B, Q, H] -> [B, Q, E]

    def _text_feat(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.qformer.text_features(input_ids, attention_mask)  # [B, T, H]
        if self.text_pooling == "cls":
            pooled = hidden[:, 0]  # [B, H]
        else:
            pooled = masked_mean(hidden, attention_mask)  # [B, T, H] -> [B, H]
        return F.normalize(self.text_proj(pooled), dim=-1)  # [B, E]

    # --- training -------------------------------------------------------------------------------------------------
    def compute_losses(
        self, tokens: Tensor, captions: list[str], ids: list[str] | None = None, data: CaptionBatch | None = None
    ) -> dict[str, Tensor]:
        """Unweighted ``itc``, ``itm`` (absent when no negative exists, e.g. a batch of one) and ``itg`` losses for
        visual tokens ``[B, N, Dv]`` and their captions, plus the objectives' losses (by their names), which read
        ``data`` (the batch; by default one made of the captions and ids); ``ids`` mark captions of one image as mutual
        positives."""
        batch = tokens.shape[0]
        # Equal text shapes on every rank for the ITM gathers; a single process pads to the longest caption only.
        input_ids, att = self.qformer.tokenize(captions, self.max_text_len, pad_to_max=world_size() > 1)  # [B, T]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        queries = self.qformer.query_features(tokens)  # [B, Q, H]
        image_feats, text_feat = self._image_feats(queries), self._text_feat(input_ids, att)
        offset = rank() * batch
        sim_i2t, sim_t2i = itc_similarities(  # [B, M] each
            image_feats, text_feat, gather_with_grad(image_feats), gather_with_grad(text_feat), self.temp
        )
        losses = {"itc": itc_loss(sim_i2t, sim_t2i, offset)}
        if self.objectives:
            if data is None:
                refs = [[c] for c in captions]
                data = CaptionBatch(pixels=tokens[:0], captions=captions, references=refs, ids=ids or [], num_skipped=0)
            losses.update(self.objective_losses(self.qformer.output(queries), data))
        itm = self._itm_loss(tokens, input_ids, att, sim_i2t.detach(), sim_t2i.detach(), offset, ids)
        if itm is not None:
            losses["itm"] = itm
        keep, labels = itg_targets(input_ids, att)  # [B, T], [K]
        losses["itg"] = itg_loss(self.qformer.itg_logits(tokens, None, input_ids, att, keep), labels)  # [K, V]
        return losses

    def _itm_loss(
        self,
        tokens: Tensor,
        input_ids: Tensor,
        att: Tensor,
        sim_i2t: Tensor,
        sim_t2i: Tensor,
        offset: int,
        ids: list[str] | None,
    ) -> Tensor | None:
        batch, total = sim_i2t.shape
        ids_all = gather_objects(list(ids)) if ids is not None else None
        positives = positive_mask(batch, total, offset, ids, ids_all)
        neg_text = sample_negatives(sim_i2t, positives)  # [B]: a text column for each local image, -1 if none
        neg_image = sample_negatives(sim_t2i, positives)  # [B]: an image column for each local text, -1 if none
        tokens_all = gather_with_grad(tokens)  # [M, N, Dv]
        ids_world, att_world = gather_no_grad(input_ids), gather_no_grad(att)  # [M, T]
        has_image, has_text = neg_image >= 0, neg_text >= 0
        num_neg = int(has_image.sum() + has_text.sum())
        if num_neg == 0 and world_size() == 1:
            return None  # nothing to tell apart; under DDP the positives still run so every rank uses itm_head
        text = torch.cat([input_ids, input_ids[has_image], ids_world[neg_text[has_text]]])  # pos, pos, neg
        text_att = torch.cat([att, att[has_image], att_world[neg_text[has_text]]])
        images = torch.cat([tokens, tokens_all[neg_image[has_image]], tokens[has_text]])  # pos, neg, pos
        queries = self.qformer.joint(images, None, text, text_att)[:, : self.qformer.num_queries]  # [P, Q, H]
        logits = self.itm_head(queries).mean(dim=1)  # [P, Q, 2] -> [P, 2]
        return F.cross_entropy(logits, itm_labels(batch, num_neg, logits.device))

    def training_losses(self, batch: CaptionBatch) -> dict[str, Tensor]:
        self.log("train/temp", self.temp.detach(), batch_size=len(batch["captions"]))
        return self.compute_losses(self.encoder(batch["pixels"]), batch["captions"], batch["ids"], batch)

    # --- validation: retrieval recall -----------------------------------------------------------------------------
    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        if self.count_skipped(batch, "val"):
            return
        image_feats = self.image_embeddings(batch["pixels"])  # [B, Q, E]
        texts = [refs or [cap] for refs, cap in zip(batch["references"], batch["captions"])]
        text_feats = self.text_embeddings([t for refs in texts for t in refs]).split([len(r) for r in texts])
        for i, sample_id in enumerate(batch["ids"]):
            self._val.append({"id": sample_id, "image": image_feats[i].cpu(), "texts": text_feats[i].cpu()})

    def on_validation_epoch_end(self) -> None:
        rows = gather_objects(self._val)
        self._val = []
        rows = list({row["id"]: row for row in reversed(rows)}.values())[::-1]  # padded repeats: first of each id
        if rows and not (self._trainer is not None and self.trainer.sanity_checking):
            images = torch.stack([r["image"] for r in rows]).float()  # [I, Q, E]
            texts = torch.cat([r["texts"] for r in rows]).float()  # [T, E]
            owner = torch.cat([torch.full((len(r["texts"]),), i) for i, r in enumerate(rows)])  # [T]
            sim = torch.einsum("iqe,te->itq", images, texts).amax(dim=-1)  # [I, T, Q] -> [I, T]
            self.log_dict({f"val/{k}": v for k, v in retrieval_recall(sim, owner).items()})  # same on every rank
        self.report_skipped("val")
