"""P-Former: prompt shapes match a bridge's, truncation, pooling, freezing, loading a stage-0 checkpoint."""

from __future__ import annotations

import pytest
import torch

from vlgen.bridges import PFormer, QFormer
from vlgen.errors import ConfigError

LLM, PROMPTS = 24, 4
TEXTS = ["a red circle above a square", "the small blue triangle"]


def make(bert_dir, llm_dim: int | None = LLM, **kwargs) -> PFormer:
    p = PFormer(str(bert_dir), **{"num_prompts": PROMPTS, "dropout": 0.0, **kwargs})
    p.build(llm_dim)
    return p.eval()


def save_stage0(p: PFormer, path) -> str:
    torch.save({"state_dict": {f"pformer.{k}": v for k, v in p.state_dict().items()}}, path)
    return str(path)


def test_prompts_have_the_shape_of_the_bridges_prompts(tiny_bert_dir):
    torch.manual_seed(0)
    p = make(tiny_bert_dir)
    q = QFormer(str(tiny_bert_dir), num_queries=PROMPTS)
    q.build(16, LLM)
    prompts = p(TEXTS)
    assert prompts.shape == q(torch.randn(2, 5, 16)).prompts.shape == (2, PROMPTS, LLM)
    assert not torch.allclose(prompts[0], prompts[1])  # each sentence gets its own prompts
    ids, att = p.tokenize(TEXTS)
    assert p.sentence_features(ids, att).shape == (2, 32)


def test_truncation_and_pooling(tiny_bert_dir):
    torch.manual_seed(0)
    cls = make(tiny_bert_dir, num_layers=1)
    assert len(cls.bert.encoder.layer) == 1 and cls.bert.pooler is None
    mean = make(tiny_bert_dir, num_layers=1, pooling="mean")
    mean.bert.load_state_dict(cls.bert.state_dict())
    ids, att = cls.tokenize(TEXTS)
    hidden = cls.bert(input_ids=ids, attention_mask=att).last_hidden_state
    torch.testing.assert_close(cls.sentence_features(ids, att), hidden[:, 0])
    expected = hidden[1, : int(att[1].sum())].mean(0)  # the shorter sentence: padding is left out
    torch.testing.assert_close(mean.sentence_features(ids, att)[1], expected)
    with pytest.raises(ConfigError, match=r"num_layers must be in 1\.\.2"):
        PFormer(str(tiny_bert_dir), num_layers=3)


def test_frozen_pformer_has_no_trainable_weights_and_stays_in_eval(tiny_bert_dir):
    p = make(tiny_bert_dir, frozen=True)
    p.train()
    assert not any(q.requires_grad for q in p.parameters()) and not p.training and not p.bert.training


def test_stage0_checkpoint_round_trip_gives_the_llm_width(tmp_path, tiny_bert_dir):
    torch.manual_seed(0)
    trained = make(tiny_bert_dir)
    ckpt = save_stage0(trained, tmp_path / "stage0.ckpt")
    loaded = make(tiny_bert_dir, llm_dim=None, init_from=ckpt)  # stage 1: the width comes from the checkpoint
    assert loaded.llm_dim == LLM
    torch.testing.assert_close(loaded(TEXTS), trained(TEXTS))


def test_stage0_checkpoint_errors_are_one_line(tmp_path, tiny_bert_dir):
    torch.manual_seed(0)
    ckpt = save_stage0(make(tiny_bert_dir), tmp_path / "stage0.ckpt")
    with pytest.raises(ConfigError, match=r"expand.weight is \(128, 32\) in .*, \(160, 32\) here"):
        make(tiny_bert_dir, num_prompts=5, init_from=ckpt)
    with pytest.raises(ConfigError, match=r"llm_proj\.weight is"):
        make(tiny_bert_dir, llm_dim=LLM + 1, init_from=ckpt)
    with pytest.raises(ConfigError, match="cannot read"):
        make(tiny_bert_dir, init_from=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"qformer.x": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="holds no pformer"):
        make(tiny_bert_dir, init_from=str(tmp_path / "other.ckpt"))
    with pytest.raises(ConfigError, match="stage-0 checkpoint is needed"):
        make(tiny_bert_dir, llm_dim=None)


def test_missing_bert_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pformer\.bert"):
        PFormer(str(tmp_path / "nope"))
