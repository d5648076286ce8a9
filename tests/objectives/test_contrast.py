"""Contrastive objectives: the sentence-encoder term (EVLGen's beta) and the LLM-embedding ITC term, on bridges with
and without a pooled feature; weights, logs, what trains and what is saved."""

from __future__ import annotations

import pytest
import torch

from vlgen.bridges import LinearProjector, QFormer, TokenMergingConnector
from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput
from vlgen.llms import CausalLM
from vlgen.models import Captioner
from vlgen.objectives import ImageTextContrast, ModelParts, PromptAlignment, SentenceContrast, itc_loss

VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
CAPTIONS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def llm(tiny_llm_dir) -> CausalLM:
    return CausalLM(str(tiny_llm_dir))


def encoder() -> TimmEncoder:
    torch.manual_seed(0)
    return TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)


def batch(n: int = 2) -> dict:
    return {
        "pixels": torch.randn(n, 3, 32, 32),
        "captions": CAPTIONS[:n],
        "references": [],
        "ids": [],
        "num_skipped": 0,
    }


def capture(model) -> dict[str, float]:
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
    return logged


def saved(model) -> set[str]:
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    return set(ckpt["state_dict"])


def test_itc_loss_is_low_for_matched_pairs_and_follows_the_offset():
    sim = torch.eye(4) * 20
    assert itc_loss(sim, sim, offset=0, label_smoothing=0.0) < 1e-6
    assert itc_loss(sim, sim, offset=0, label_smoothing=0.0) < itc_loss(sim, sim.roll(1, 0), 0, 0.0)
    wide = torch.cat([torch.zeros(2, 2), torch.eye(2) * 20], dim=1)  # this rank's rows match columns 2 and 3
    assert itc_loss(wide, wide, offset=2, label_smoothing=0.0) < 1e-6


def test_sentence_contrast_trains_the_connector_not_the_sentence_encoder(tiny_bert_dir, llm):
    bridge = TokenMergingConnector(num_layers=2, r=4, hidden_size=32, num_heads=2)
    contrast = SentenceContrast(str(tiny_bert_dir), weight=0.5, embed_dim=8)
    model = Captioner(encoder(), bridge, llm, objectives=[contrast])
    logged = capture(model)
    loss = model.training_step(batch(), 0)
    assert {"train/loss", "train/lm_loss", "train/contrastive"} <= set(logged)
    torch.testing.assert_close(
        loss.detach(), torch.tensor(logged["train/lm_loss"] + 0.5 * logged["train/contrastive"]), rtol=1e-5, atol=1e-5
    )
    loss.backward()
    assert bridge.input_proj.weight.grad is not None and contrast.text_proj.weight.grad is not None
    assert contrast.vision_proj.in_features == bridge.pooled_dim  # the connector's own pooled feature
    assert all(p.grad is None for p in contrast.encoder.parameters())
    model.train()
    assert not contrast.encoder.training
    keys = saved(model)  # the frozen sentence encoder is rebuilt from its checkpoint, not saved
    assert "objectives.0.text_proj.weight" in keys and "objectives.0.temp" in keys
    assert not any(k.startswith("objectives.0.encoder.") for k in keys)


def test_itc_reads_the_llms_embeddings_of_the_caption(llm):
    term = ImageTextContrast(weight=1.0, embed_dim=8)
    bridge = LinearProjector()
    bridge.build(32, llm.hidden_size)
    parts = ModelParts(encoder(), bridge, llm)
    term.build(parts)
    feats = term.text_features(CAPTIONS, parts)
    table = llm.model.get_input_embeddings().weight
    by_hand = table[llm.tokenizer("a red circle", add_special_tokens=False).input_ids].mean(0)
    torch.testing.assert_close(feats[0], by_hand)
    assert feats.shape == (3, llm.hidden_size) and not feats.requires_grad


def test_itc_on_a_projector_uses_the_mean_of_its_real_prompts(llm):
    term = ImageTextContrast(weight=1.0, embed_dim=8)
    bridge = LinearProjector()
    bridge.build(32, llm.hidden_size)
    term.build(ModelParts(encoder(), bridge, llm))
    assert bridge.pooled_dim is None and term.vision_proj.in_features == llm.hidden_size
    prompts = torch.randn(2, 3, llm.hidden_size)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    padded = prompts.clone()
    padded[0, 2] = 1e3  # a padded prompt must not move the feature
    torch.testing.assert_close(term.pooled(BridgeOutput(prompts, mask)), term.pooled(BridgeOutput(padded, mask)))
    torch.testing.assert_close(term.pooled(BridgeOutput(prompts, mask))[0], prompts[0, :2].mean(0))


@pytest.mark.parametrize("make_bridge", ["projector", "qformer", "connector"])
def test_itc_trains_any_bridge_and_leaves_the_llm_frozen(make_bridge, tiny_bert_dir, llm):
    bridges = {
        "projector": lambda: LinearProjector(),
        "qformer": lambda: QFormer(str(tiny_bert_dir), num_queries=4),
        "connector": lambda: TokenMergingConnector(num_layers=1, r=2, hidden_size=32, num_heads=2),
    }
    bridge = bridges[make_bridge]()
    model = Captioner(encoder(), bridge, llm, objectives=[ImageTextContrast(weight=0.25, embed_dim=8)])
    logged = capture(model)
    loss = model.training_step(batch(3), 0)
    assert logged["train/itc"] > 0
    torch.testing.assert_close(
        loss.detach(), torch.tensor(logged["train/lm_loss"] + 0.25 * logged["train/itc"]), rtol=1e-5, atol=1e-5
    )
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge.parameters())
    assert all(p.grad is None for p in llm.parameters())
    assert model.objectives[0].temp.grad is not None


def test_itc_with_no_llm_and_no_pooled_feature_stops_at_build():
    bridge = LinearProjector()
    bridge.build(32, 16)
    with pytest.raises(ConfigError, match=r"^model\.objectives: itc: LinearProjector gives no pooled feature"):
        ImageTextContrast().build(ModelParts(encoder(), bridge, None))


def test_two_terms_of_one_name_stop_with_one_line(llm):
    with pytest.raises(ConfigError, match=r"^model\.objectives: two training terms are named 'itc'"):
        Captioner(encoder(), LinearProjector(), llm, objectives=[ImageTextContrast(), ImageTextContrast()])


def test_the_itc_term_makes_matched_pairs_find_each_other(llm):
    """A few steps of the term alone on a fixed batch: the pooled features of distinct captions separate."""
    torch.manual_seed(0)
    term = ImageTextContrast(weight=1.0, embed_dim=8, label_smoothing=0.0)
    bridge = LinearProjector()
    bridge.build(32, llm.hidden_size)
    parts = ModelParts(encoder(), bridge, llm)
    term.build(parts)
    tokens = torch.randn(3, 5, 32)
    opt = torch.optim.Adam([*bridge.parameters(), *term.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = term.loss(bridge(tokens), batch(3), parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]


def test_prompt_alignment_is_an_objective_too():
    assert (
        PromptAlignment.name == "align" and SentenceContrast.name == "contrastive" and ImageTextContrast.name == "itc"
    )
