"""BLIP-2 stage 1: the three losses, hard negatives, recall, a Trainer run, and stage 2 starting from its checkpoint."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from vlgen.bridges import QFormer
from vlgen.errors import ConfigError
from vlgen.interfaces import VisualEncoder
from vlgen.models.base import Optim
from vlgen.models.blip2_losses import (
    itg_loss,
    itg_targets,
    itm_labels,
    positive_mask,
    retrieval_recall,
    sample_negatives,
)
from vlgen.models.blip2_stage1 import Blip2Stage1
from vlgen.objectives.contrast import itc_loss

VISION = 16
CAPTIONS = ["a red circle", "a blue square", "the green triangle above a circle", "a small square left of a circle"]


class TokenEncoder(VisualEncoder):
    """A stand-in encoder: the 'pixels' already are visual tokens [B, 5, 16]."""

    embed_dim = VISION  # type: ignore[assignment]

    def image_transform(self, train: bool) -> Callable[[Any], Tensor]:
        return lambda image: image

    def forward(self, pixels: Tensor) -> Tensor:
        return pixels


def make(bert_dir, **kwargs) -> Blip2Stage1:
    qformer = QFormer(str(bert_dir), num_queries=4, text_input=True, dropout=0.0)
    model = Blip2Stage1(TokenEncoder(), qformer, embed_dim=8, max_text_len=12, **kwargs)
    model.log = lambda *a, **k: None  # no trainer attached
    return model


def batch(n: int = 4, ids: list[str] | None = None) -> dict:
    g = torch.Generator().manual_seed(n)
    return {
        "pixels": torch.randn(n, 5, VISION, generator=g),
        "captions": CAPTIONS[:n],
        "references": [[c, "a photo"] for c in CAPTIONS[:n]],
        "ids": ids or [str(i) for i in range(n)],
        "num_skipped": 0,
    }


@pytest.fixture
def model(tiny_bert_dir) -> Blip2Stage1:
    torch.manual_seed(0)
    return make(tiny_bert_dir)


def test_all_losses_finite_logged_and_trained(model):
    logged: dict[str, Tensor] = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    loss = model.training_step(batch(), 0)
    assert {"train/itc", "train/itm", "train/itg", "train/loss"} <= set(logged)
    assert all(torch.isfinite(v) for v in logged.values())
    torch.testing.assert_close(loss, logged["train/itc"] + logged["train/itm"] + logged["train/itg"])
    loss.backward()
    for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp", "qformer.query_tokens"):
        assert model.get_parameter(name).grad is not None, name
    assert model.qformer.layers[0].crossattention.attention.key.weight.grad is not None


def test_loss_weights_scale_the_total(tiny_bert_dir):
    torch.manual_seed(0)
    model = make(tiny_bert_dir, itc_weight=2.0, itm_weight=0.0, itg_weight=0.5)
    logged: dict[str, Tensor] = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    torch.manual_seed(1)
    loss = model.training_step(batch(), 0)
    torch.testing.assert_close(loss, 2 * logged["train/itc"] + 0.5 * logged["train/itg"])


def test_itc_decreases_on_a_fixed_batch(model):
    b = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(20):
        losses = model.compute_losses(b["pixels"], b["captions"], b["ids"])
        history.append(losses["itc"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.7 * history[0]
    assert 0.001 <= model.temp.item() <= 0.5


def test_itm_pairs_positives_then_hard_negatives(model):
    seen = {}
    joint = model.qformer.joint

    def spy(tokens, mask, input_ids, attention_mask):
        seen.update(tokens=tokens, input_ids=input_ids)
        return joint(tokens, mask, input_ids, attention_mask)

    model.qformer.joint = spy
    b = batch()
    model.compute_losses(b["pixels"], b["captions"], b["ids"])
    ids, _ = model.qformer.tokenize(b["captions"], 12, pad_to_max=False)  # one process: padded to the longest
    tokens, texts = seen["tokens"], seen["input_ids"]
    assert tokens.shape[0] == texts.shape[0] == 12
    torch.testing.assert_close(tokens[:4], b["pixels"])
    assert torch.equal(texts[:4], ids) and torch.equal(texts[4:8], ids)  # positives, then texts of negative images
    torch.testing.assert_close(tokens[8:], b["pixels"])  # images of negative texts
    for i in range(4):
        assert not torch.equal(tokens[4 + i], b["pixels"][i])  # a negative image is never the text's own image
        assert not torch.equal(texts[8 + i], ids[i])  # a negative text is never the image's own text
    assert itm_labels(4, 8).tolist() == [1] * 4 + [0] * 8


def test_hard_negatives_avoid_positives_and_same_image_duplicates():
    ids = ["a", "a", "b", "c"]
    positives = positive_mask(4, 4, 0, ids, ids)
    assert positives.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        sim = torch.randn(4, 4, generator=g) * 5
        neg = sample_negatives(sim, positives, generator=g)
        assert not positives[torch.arange(4), neg].any()
    hard = torch.tensor([[0.0, 0.0, 10.0, -10.0]] * 4)  # column 2 dominates the softmax
    neg = sample_negatives(hard, positive_mask(4, 4, 0, None, None), generator=torch.Generator().manual_seed(0))
    assert neg[[0, 1, 3]].tolist() == [2, 2, 2]
    assert sample_negatives(torch.zeros(1, 1), positive_mask(1, 1, 0, None, None)).tolist() == [-1]
    assert positive_mask(2, 6, 2, None, None).nonzero().tolist() == [[0, 2], [1, 3]]  # rank 1 of 3


def test_batch_of_one_skips_itm(model):
    logged: dict[str, Tensor] = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    loss = model.training_step(batch(1), 0)
    assert "train/itm" not in logged and torch.isfinite(loss)
    loss.backward()
    b = batch(2, ids=["x", "x"])  # two captions of one image: no negative either
    assert "itm" not in model.compute_losses(b["pixels"], b["captions"], b["ids"])


def test_itc_loss_targets_follow_the_rank_offset():
    sim = torch.full((2, 6), -20.0)
    sim[0, 2] = sim[1, 3] = 20.0  # this rank's samples sit at columns 2 and 3 (rank 1, batch 2)
    assert itc_loss(sim, sim, offset=2, label_smoothing=0.0) < 1e-6
    assert itc_loss(sim, sim, offset=0, label_smoothing=0.0) > 10


def test_itg_targets_skip_padding_and_the_first_token():
    ids = torch.tensor([[1, 2, 3, 0], [1, 4, 0, 0]])
    att = (ids > 0).long()
    keep, labels = itg_targets(ids, att)
    assert keep.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert labels.tolist() == [2, 3, 4]  # what positions (0, 0), (0, 1), (1, 0) predict
    logits = torch.randn(2, 4, 10)
    manual = torch.nn.functional.cross_entropy(logits[[0, 0, 1], [0, 1, 0]], torch.tensor([2, 3, 4]))
    torch.testing.assert_close(itg_loss(logits[keep], labels, label_smoothing=0.0), manual)
    full = logits[:, :-1].reshape(-1, 10)  # the unpacked form: every position, padding ignored
    ignored = ids.masked_fill(att == 0, -100)[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(full, ignored, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(itg_loss(logits[keep], labels), expected)


def test_padding_to_the_longest_caption_changes_no_loss(model):
    b = batch(4)
    tokens = model.encoder(b["pixels"])
    assert model.qformer.tokenize(b["captions"], 12, pad_to_max=False)[0].shape[1] < 12  # the paddings differ
    state = torch.random.get_rng_state()
    short = model.compute_losses(tokens, b["captions"], b["ids"])  # one process pads to the longest caption
    torch.random.set_rng_state(state)  # the same hard negatives
    tokenize = model.qformer.tokenize
    with mock.patch.object(model.qformer, "tokenize", lambda t, n, pad_to_max=True: tokenize(t, n, pad_to_max=True)):
        full = model.compute_losses(tokens, b["captions"], b["ids"])  # as under DDP: padded to max_text_len
    assert set(short) == set(full) == {"itc", "itm", "itg"}
    for key in short:
        torch.testing.assert_close(short[key], full[key], rtol=1e-4, atol=1e-5)


def test_retrieval_recall_counts_any_reference():
    # 2 images; texts 0, 1 belong to image 0, text 2 to image 1.
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    scores = retrieval_recall(sim, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert scores["r1_i2t"] == 50.0  # image 0 -> text 1 (its own), image 1 -> text 0 (not its own)
    assert scores["r2_i2t"] == 100.0  # image 1's top 2 are texts 0 and 2 (its own)
    assert scores["r1_t2i"] == pytest.approx(100 / 3)  # text 0 -> image 1 (miss), 1 -> 0 (hit), 2 -> 0 (miss)
    assert scores["r2_t2i"] == 100.0


def test_requires_text_input(tiny_bert_dir):
    with pytest.raises(ConfigError, match="text_input"):
        Blip2Stage1(TokenEncoder(), QFormer(str(tiny_bert_dir), num_queries=4))


def test_trainer_run_logs_recall_and_stage2_starts_from_the_checkpoint(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    model = make(tiny_bert_dir, optim=Optim(lr=1e-3, warmup_steps=1))
    del model.log  # the real Trainer logs
    train = [batch(4)] * 3
    val = [batch(3), batch(2)]
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=_loader(train), val_dataloaders=_loader(val))
    metrics = trainer.callback_metrics
    assert {"train/itc", "train/itm", "train/itg", "train/loss"} <= set(metrics)
    for key in ("val/r1_i2t", "val/r5_i2t", "val/r1_t2i", "val/r5_t2i"):
        assert 0.0 <= float(metrics[key]) <= 100.0
    assert float(metrics["val/r5_i2t"]) == 100.0  # 3 images (repeated ids dropped), 6 texts: top 5 holds one
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(5)
    fresh = QFormer(str(tiny_bert_dir), num_queries=4, init_from=None)
    fresh.build(VISION, 24)
    torch.manual_seed(5)
    stage2 = QFormer(str(tiny_bert_dir), num_queries=4, init_from=str(ckpt))
    stage2.build(VISION, 24)
    trained = model.qformer.state_dict()
    loaded = stage2.state_dict()
    assert not any(k.startswith(("embeddings.", "cls.")) for k in loaded)  # no text path in a captioning bridge
    for key, value in loaded.items():
        if key.startswith("language_projection."):
            torch.testing.assert_close(value, fresh.state_dict()[key], rtol=0, atol=0)  # fresh, not loaded
        else:
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert not torch.equal(loaded["query_tokens"], fresh.state_dict()["query_tokens"])  # training moved them

    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "crossattention" not in k}
    torch.save(state, tmp_path / "broken.ckpt")
    with pytest.raises(ConfigError, match="lacks"):
        QFormer(str(tiny_bert_dir), num_queries=4, init_from=str(tmp_path / "broken.ckpt")).build(VISION, 24)


def _ddp_worker(rank: int, world: int, port: int, bert_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = make(bert_dir)
        b, part = batch(4), slice(2 * rank, 2 * rank + 2)
        losses = model.compute_losses(b["pixels"][part], b["captions"][part], b["ids"][part])
        losses["itc"].backward()
        result = {"itc": losses["itc"].detach(), "has_itm": "itm" in losses, "grad": model.vision_proj.weight.grad}
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_gather_contrastive_negatives_with_gradients(tiny_bert_dir, tmp_path):
    """Two ranks of batch 2 give the contrastive loss and (rank-averaged) gradients of one process with batch 4."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny_bert_dir), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    torch.manual_seed(0)
    model = make(tiny_bert_dir)
    b = batch(4)
    itc = model.compute_losses(b["pixels"], b["captions"], b["ids"])["itc"]
    itc.backward()
    assert all(r["has_itm"] for r in ranks)
    torch.testing.assert_close((ranks[0]["itc"] + ranks[1]["itc"]) / 2, itc.detach())
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, model.vision_proj.weight.grad)


def _loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_mean_text_pooling_ignores_padding(tiny_bert_dir):
    torch.manual_seed(0)
    model = make(tiny_bert_dir, text_pooling="mean")
    ids, att = model.qformer.tokenize(["a red circle", "a small blue square left of a circle"], 12)
    both = model._text_feat(ids, att)
    alone = model._text_feat(*model.qformer.tokenize(["a red circle"], 12, pad_to_max=False))
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-5)  # padding to 12 tokens changes nothing
    hidden = model.qformer.text_features(ids, att)
    n = int(att[0].sum())
    expected = torch.nn.functional.normalize(model.text_proj(hidden[0, :n].mean(0)), dim=-1)
    torch.testing.assert_close(both[0], expected, rtol=1e-4, atol=1e-5)
    model.text_pooling = "cls"
    torch.testing.assert_close(model._text_feat(ids, att), torch.nn.functional.normalize(model.text_proj(hidden[:, 0])))
