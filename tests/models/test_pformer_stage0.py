"""P-Former stage 0: the three losses (finite, logged, weighted), masking, VQ, learning, validation, checkpoints."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from vlgen.bridges import PFormer
from vlgen.errors import ConfigError
from vlgen.llms import CausalLM, Decoding
from vlgen.models import PFormerStage0
from vlgen.models.pformer_stage0 import mask_tokens, normalise, self_contrastive_loss, vq_loss

TEXTS = ["a red circle above a square", "the small blue triangle", "a green square left of a circle", "a circle"]


@pytest.fixture(scope="module")
def llm(tiny_llm_dir) -> CausalLM:
    return CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=8))


def make(bert_dir, llm: CausalLM, **kwargs) -> PFormerStage0:
    torch.manual_seed(0)
    model = PFormerStage0(PFormer(str(bert_dir), num_prompts=3, dropout=0.0), llm, embed_dim=8, **kwargs)
    model.log = lambda *a, **k: None  # no trainer attached
    return model


def capture(model: PFormerStage0) -> dict[str, Tensor]:
    logged: dict[str, Tensor] = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    model.log_dict = lambda values, **k: logged.update(values)
    return logged


def test_losses_finite_logged_and_weighted(tiny_bert_dir, llm):
    model = make(tiny_bert_dir, llm, lm_weight=2.0, contrastive_weight=0.5, vq_weight=3.0)
    logged = capture(model)
    torch.manual_seed(1)
    loss = model.training_step({"text": TEXTS, "num_skipped": 0}, 0)
    assert {"train/loss", "train/lm", "train/contrastive", "train/vq"} == set(logged)
    assert all(torch.isfinite(v) and v > 0 for v in logged.values())
    expected = 2.0 * logged["train/lm"] + 0.5 * logged["train/contrastive"] + 3.0 * logged["train/vq"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name in ("pformer.expand.weight", "pformer.llm_proj.weight", "text_proj.weight"):
        assert model.get_parameter(name).grad is not None, name
    assert all(p.grad is None for p in model.llm.parameters())


def test_a_zero_weight_skips_its_loss(tiny_bert_dir, llm):
    model = make(tiny_bert_dir, llm, vq_weight=0.0, contrastive_weight=0.0)
    assert set(model.compute_losses(TEXTS)) == {"lm"}


def test_reconstruction_loss_falls_on_a_fixed_batch(tiny_bert_dir, llm):
    model = make(tiny_bert_dir, llm, contrastive_weight=0.0, vq_weight=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(12):
        loss = model.compute_losses(TEXTS)["lm"]
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A random tiny LLM barely listens to its prompts: ~10% lower after 12 steps, falling at every step.
    assert history[-1] < 0.95 * history[0]
    assert sum(b < a for a, b in itertools.pairwise(history)) >= 9


def test_masking_hits_a_quarter_of_real_non_special_tokens():
    ids = torch.randint(10, 100, (64, 40))
    ids[:, 0], ids[:, 30] = 1, 2  # [CLS], [SEP]
    att = torch.ones_like(ids)
    att[:, 31:] = 0  # padding
    ids[:, 31:] = 0
    masked = mask_tokens(ids, att, torch.tensor([0, 1, 2]), 3, 0.25, torch.Generator().manual_seed(0))
    hit = masked == 3
    assert not hit[:, [0, 30]].any() and not hit[:, 31:].any()
    assert 0.22 < hit[:, 1:30].float().mean().item() < 0.28
    assert torch.equal(masked[~hit], ids[~hit])


def test_vq_loss_is_zero_on_vocabulary_embeddings_and_pulls_towards_them():
    vocab = torch.randn(50, 8)
    assert vq_loss(vocab[torch.tensor([[3, 7], [7, 49]])], vocab).item() == 0.0
    prompts = (vocab[:4] + 0.01 * torch.randn(4, 8)).reshape(2, 2, 8).requires_grad_()
    loss = vq_loss(prompts, vocab)
    torch.testing.assert_close(loss, ((prompts.detach() - vocab[:4].reshape(2, 2, 8)) ** 2).mean())
    loss.backward()
    assert prompts.grad is not None


def test_contrastive_loss_prefers_matching_views():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    matched = self_contrastive_loss(a, a, a, a, 0.07, 0.1)
    shuffled = self_contrastive_loss(a, a.roll(1, 0), a, a.roll(1, 0), 0.07, 0.1)
    assert matched < shuffled


def test_validation_logs_exact_match_and_losses(tiny_bert_dir, llm):
    model = make(tiny_bert_dir, llm)
    logged = capture(model)
    model.reconstruct = lambda texts: [t.upper() + " " for t in texts[:-1]] + ["wrong"]
    model.validation_step({"text": TEXTS, "num_skipped": 0}, 0)
    assert logged["val/exact_match"] == pytest.approx(0.75)
    assert {"val/lm", "val/contrastive", "val/vq", "val/loss"} <= set(logged)
    assert normalise("A red  circle, left.") == normalise("a red circle , left .")


def test_checkpoint_holds_the_pformer_not_the_llm(tiny_bert_dir, llm):
    model = make(tiny_bert_dir, llm)
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert {f"pformer.{k}" for k in model.pformer.state_dict()} <= keys and "text_proj.weight" in keys
    assert not any(k.startswith("llm.") for k in keys)


def test_a_frozen_pformer_is_refused(tiny_bert_dir, llm):
    with pytest.raises(ConfigError, match="frozen must be false"):
        PFormerStage0(PFormer(str(tiny_bert_dir), num_prompts=3, frozen=True), llm)
