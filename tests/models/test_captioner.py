"""Captioner: only trainable parts train and get saved; the schedule; a fully skipped batch is not an error."""

from __future__ import annotations

import pytest
import torch

from vlgen.bridges import MLPProjector
from vlgen.encoders import TimmEncoder
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner
from vlgen.models.base import warmup_cosine

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.fixture
def model(tiny_llm_dir):
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    m = Captioner(enc, MLPProjector(), CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=4)))
    m.log = lambda *a, **k: None  # no trainer attached
    return m


def batch(n: int = 2) -> dict:
    return {
        "pixels": torch.randn(n, 3, 32, 32),
        "captions": ["a red circle"] * n,
        "references": [["a red circle"]] * n,
        "ids": [str(i) for i in range(n)],
        "num_skipped": 0,
    }


def test_widths_are_derived_and_only_the_bridge_learns(model):
    assert model.bridge.mlp[1].in_features == 32 and model.bridge.mlp[-1].out_features == 64
    model.training_step(batch(), 0).backward()
    assert all(p.grad is not None for p in model.bridge.parameters())
    assert all(p.grad is None for p in model.llm.parameters()) and all(
        p.grad is None for p in model.encoder.parameters()
    )


def test_checkpoint_keeps_only_trainable_weights_and_checks_them_on_load(model):
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("bridge.") for k in ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)  # complete: no error
    broken = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if "mlp.1" not in k}}
    with pytest.raises(KeyError, match="trainable weights"):
        model.on_load_checkpoint(broken)


def test_empty_batch_is_skipped_and_counted(model):
    empty = {"pixels": torch.empty(0), "captions": [], "references": [], "ids": [], "num_skipped": 3}
    assert model.training_step(empty, 0) is None
    assert model._skipped == 3


def test_caption_returns_text_per_image(model):
    out = model.caption(torch.randn(3, 3, 32, 32))
    assert len(out) == 3 and all(isinstance(c, str) for c in out)


def test_warmup_then_cosine_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_per_sample_text_fills_the_template_in_training_and_generation(tiny_llm_dir):
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    llm = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=4))
    model = Captioner(enc, MLPProjector(), llm, prompt="a photo of", prompt_template="question {} short answer")
    logged: dict = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    asked = {**batch(), "prompts": ["what colour", "what shape"]}
    assert model.prefixes(2, asked["prompts"]) == [
        "question what colour short answer",
        "question what shape short answer",
    ]
    assert model.prefixes(2) == ["a photo of", "a photo of"]
    model.eval()
    torch.manual_seed(0)
    loss = model.training_step(asked, 0)
    out = model(asked["pixels"])
    by_hand = llm.loss(out.prompts, out.mask, model.prefixes(2, asked["prompts"]), asked["captions"])
    torch.testing.assert_close(loss, by_hand)
    plain = llm.loss(out.prompts, out.mask, model.prefixes(2), asked["captions"])
    assert not torch.allclose(loss, plain)  # the questions were read, not the global prompt
    captions = model.caption(asked["pixels"], asked["prompts"])
    assert captions == llm.generate(out.prompts, out.mask, model.prefixes(2, asked["prompts"]))


def test_a_template_without_one_slot_stops_with_one_line(tiny_llm_dir):
    from vlgen.errors import ConfigError

    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    with pytest.raises(ConfigError, match=r"^model\.prompt_template must hold exactly one \{\}"):
        Captioner(enc, MLPProjector(), CausalLM(str(tiny_llm_dir)), prompt_template="Question: Short answer:")
