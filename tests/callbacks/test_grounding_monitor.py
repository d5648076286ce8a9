"""The grounding monitor: its figures by hand, a model that ignores its prompts is flagged, attention mass on the
prompt positions, and no side effect on training (bitwise the same weights with and without it)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from vlgen.bridges import MLPProjector
from vlgen.callbacks import GroundingMonitor
from vlgen.callbacks.grounding import _prompt_mass, attention_probe, grounding_figures
from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner, Optim

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a big red square"]


def make(llm_dir, lr: float = 1e-2) -> Captioner:
    torch.manual_seed(0)
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    llm = CausalLM(str(llm_dir), decoding=Decoding(max_new_tokens=2))
    model = Captioner(enc, MLPProjector(), llm, optim=Optim(lr=lr, warmup_steps=0, weight_decay=0.0))
    model.setup("fit")
    return model


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randn(4, 3, 32, 32, generator=g),
        "captions": CAPTIONS,
        "references": [[c] for c in CAPTIONS],
        "ids": [str(i) for i in range(4)],
        "num_skipped": 0,
    }


def test_figures_are_the_losses_they_name_and_leave_the_model_as_it_was(tiny_llm_dir):
    model = make(tiny_llm_dir).train()
    b = batch()
    state = torch.get_rng_state()
    figures = grounding_figures(model, b)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()
    with torch.no_grad():
        out = model(b["pixels"])
        prefixes = model.prefixes(4)
        own = model.lm_loss(out, prefixes, b)
        rolled = model.lm_loss(BridgeOutput(out.prompts.roll(1, 0)), prefixes, b)
        zero = model.lm_loss(BridgeOutput(torch.zeros_like(out.prompts)), prefixes, b)
        table = model.llm.model.get_input_embeddings().weight
        ratio = out.prompts.norm(dim=-1).mean() / table.norm(dim=-1).mean()
    assert figures["grounding_gap"] == pytest.approx(float(rolled - own), abs=1e-6)
    assert figures["grounding_gap_zero"] == pytest.approx(float(zero - own), abs=1e-6)
    assert figures["prompt_norm_ratio"] == pytest.approx(float(ratio), rel=1e-5)
    assert figures["grounding_gap"] != 0  # the prompts differ per image, so the random LM's loss does too
    assert 0.0 < figures["prompt_attention"] < 1.0


def test_attention_mass_is_counted_on_the_prompt_positions(tiny_llm_dir):
    """Against a hand count: prompts at known positions, eager attentions, the mean over layers, heads and the
    positions after the prompts of the weight on the prompt positions."""
    model = make(tiny_llm_dir).eval()
    lm = model.llm.model
    torch.manual_seed(1)
    prompts = torch.randn(2, 3, lm.config.hidden_size)
    text = lm.get_input_embeddings()(torch.randint(5, 20, (2, 4)))
    embeds = torch.cat([prompts, text], 1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -1] = 0  # a padded position is no query
    with torch.no_grad():
        lm.config._attn_implementation, before = "eager", lm.config._attn_implementation
        attentions = lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions
        lm.config._attn_implementation = before
    stacked = torch.stack(attentions)  # [layers, B, heads, L, L]
    by_hand = [stacked[:, i, :, q, :3].sum(-1).mean() for i in range(2) for q in range(3, 7) if mask[i, q]]
    assert _prompt_mass(attentions, embeds, mask, prompts) == pytest.approx(float(torch.stack(by_hand).mean()))
    with attention_probe(model.llm, prompts) as probe:
        with torch.no_grad():
            lm(inputs_embeds=embeds, attention_mask=mask)
    assert probe.mass == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)
    assert lm.config._attn_implementation == before  # put back


def test_a_model_whose_prompts_carry_no_image_is_flagged_once(tiny_llm_dir, caplog):
    """A bridge that gives every image the same prompts: the gap is exactly 0 and, after warm-up and patience, one
    warning line says the LLM is not reading the image."""
    model = make(tiny_llm_dir)
    model.bridge.build(model.encoder.embed_dim, model.llm.hidden_size)
    for module in model.bridge.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)  # the prompts are the last bias alone: the same for every image
    monitor = GroundingMonitor(every_n_steps=1, warmup_steps=2, patience=2)
    figures = grounding_figures(model, batch())
    assert figures["grounding_gap"] == 0.0
    with caplog.at_level(logging.WARNING):
        for step in range(1, 6):
            monitor._judge(step, figures["grounding_gap"])
    warned = [r for r in caplog.records if "not reading the image" in r.getMessage()]
    assert len(warned) == 1 and "at step 3" in warned[0].getMessage()


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="GroundingMonitor"):
        GroundingMonitor(every_n_steps=0)


def fit(llm_dir, tmp_path, callbacks: list) -> tuple[Captioner, pl.Trainer]:
    model = make(llm_dir)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=callbacks)  # fmt: skip
    batches = [batch(i) for i in range(6)]
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    return model, trainer


def test_in_a_real_fit_it_logs_every_n_steps_and_changes_nothing(tiny_llm_dir, tmp_path):
    plain, _ = fit(tiny_llm_dir, tmp_path / "plain", [])
    monitor = GroundingMonitor(every_n_steps=2, warmup_steps=0)
    watched, trainer = fit(tiny_llm_dir, tmp_path / "watched", [monitor])
    assert [step for step, _ in monitor.history] == [2, 4, 6]
    assert all(math.isfinite(f["grounding_gap"]) for _, f in monitor.history)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # every check reaches the logger
        rows = [r for r in csv.DictReader(f) if r.get("train/grounding_gap")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and all(r["train/prompt_attention"] for r in rows)
    assert float(rows[0]["train/grounding_gap"]) == pytest.approx(monitor.history[0][1]["grounding_gap"])
    a, b = plain.bridge.state_dict(), watched.bridge.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the monitor draws no random number, updates nothing


def test_attention_mass_is_the_same_when_the_head_before_the_prompts_is_cached(tiny_llm_dir):
    """An LLM with text before the prompts reads it from a key-value cache in training: the probe still finds the
    prompts among the positions after the cache and counts the attention the later positions pay them."""
    llm = CausalLM(str(tiny_llm_dir), context="a picture of")
    torch.manual_seed(2)
    prompts = torch.randn(2, 3, llm.hidden_size)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    args = (mask, ["", " what colour"], ["a red circle", "red"])
    masses = []
    for cached in (True, False):
        llm._head_cacheable = lambda cached=cached: cached
        with attention_probe(llm, prompts) as probe, torch.no_grad():
            llm.loss(prompts, *args)
        masses.append(probe.mass)
    assert llm._head_cache is not None and 0.0 < masses[0] < 1.0
    assert masses[0] == pytest.approx(masses[1], rel=1e-5)
