"""BLIP-2 stage-1 objectives as pure functions, apart from the module that owns the weights.

Image-text contrastive similarity (the best of the query similarities) and its loss, hard-negative sampling for
image-text matching, the captioning (ITG) loss and retrieval recall for validation; the cross-rank gathers they
need live in :mod:`vlgen.dist`. Shapes: ``B`` local batch, ``M = world_size * B``, ``Q`` queries, ``E`` the
contrastive width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def itc_similarities(
    image_feats: Tensor, text_feat: Tensor, image_feats_all: Tensor, text_feat_all: Tensor, temp: Tensor
) -> tuple[Tensor, Tensor]:
    """``(sim_i2t, sim_t2i)``, each ``[B, M]``: the highest query similarity between local images and all texts,
    and between local texts and all images, divided by the temperature.

    ``image_feats [B, Q, E]``, ``text_feat [B, E]`` are local and normalised; the ``_all`` versions ``[M, ...]``.
    """
    sim_i2t = torch.einsum("bqe,me->bmq", image_feats, text_feat_all).amax(dim=-1)  # [B, M, Q] -> [B, M]
    sim_t2i = torch.einsum("be,mqe->bmq", text_feat, image_feats_all).amax(dim=-1)  # [B, M, Q] -> [B, M]
    return sim_i2t / temp, sim_t2i / temp


def positive_mask(batch: int, total: int, offset: int, ids: list[str] | None, ids_all: list[str] | None) -> Tensor:
    """``[B, M]`` True where column ``m`` shows the same image as local sample ``b``: the diagonal at ``offset``,
    plus every other sample with the same id when ids are given (several captions of one image in a batch)."""
    mask = torch.zeros(batch, total, dtype=torch.bool)
    mask[torch.arange(batch), torch.arange(batch) + offset] = True
    if ids is not None and ids_all is not None:
        mask |= torch.tensor([[a == b for b in ids_all] for a in ids], dtype=torch.bool).reshape(batch, total)
    return mask


@torch.no_grad()
def sample_negatives(sim: Tensor, positives: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One hard negative per row, drawn with probability ``softmax(sim)`` over the non-positive columns.

    Returns ``[B]`` column indices, ``-1`` where a row has no candidate (a batch of one, or all one image).
    """
    positives = positives.to(sim.device)
    out = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    valid = (~positives).any(dim=1)
    if valid.any():
        weights = F.softmax(sim.float().masked_fill(positives, float("-inf"))[valid], dim=1)
        out[valid] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return out


def itm_labels(num_pos: int, num_neg: int, device: torch.device | None = None) -> Tensor:
    """``[1] * num_pos + [0] * num_neg``: positives first, then (negative image, text), then (image, negative text)."""
    return torch.cat([torch.ones(num_pos, dtype=torch.long), torch.zeros(num_neg, dtype=torch.long)]).to(device)


def itg_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(keep [B, T], labels [K])`` for captioning: position ``t`` predicts token ``t + 1`` and is kept when that
    token is real text, so the first token ([DEC]) is never a target and nothing predicts padding. ``logits[keep]``
    and ``labels`` line up (both in row-major order)."""
    real = attention_mask[:, 1:].bool()  # [B, T - 1]: token t + 1 is text
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    keep[:, :-1] = real
    return keep, input_ids[:, 1:][real]


def itg_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Cross-entropy of the kept positions' ``logits [K, V]`` on ``labels [K]`` (see :func:`itg_targets`; LAVIS
    smooths by 0.1)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@torch.no_grad()
def retrieval_recall(sim: Tensor, text_owner: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k in percent from image-text similarities ``sim [I, T]``; text ``t`` describes image ``text_owner[t]``.

    Image -> text: a hit when any caption of the image is among the top ``k`` texts. Text -> image: a hit when the
    text's own image is among the top ``k`` images.
    """
    num_images, num_texts = sim.shape
    text_owner = text_owner.to(sim.device)
    out: dict[str, float] = {}
    for k in ks:
        top_texts = sim.topk(min(k, num_texts), dim=1).indices  # [I, k]
        hit_i2t = (text_owner[top_texts] == torch.arange(num_images, device=sim.device)[:, None]).any(dim=1)
        top_images = sim.t().topk(min(k, num_images), dim=1).indices  # [T, k]
        hit_t2i = (top_images == text_owner[:, None]).any(dim=1)
        out[f"r{k}_i2t"] = 100.0 * hit_i2t.float().mean().item()
        out[f"r{k}_t2i"] = 100.0 * hit_t2i.float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out
