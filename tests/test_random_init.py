"""RandomWeights: a model directory from a config.json alone, loaded through the ordinary from_pretrained path; the
shipped paper-model configs have the papers' sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from vlgen.errors import ConfigError
from vlgen.llms import CausalLM
from vlgen.random_init import RandomWeights

REPO = Path(__file__).resolve().parents[1]
OPT = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 64, "hidden_size": 16,
       "word_embed_proj_dim": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
       "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}  # fmt: skip


def test_a_random_model_loads_through_the_llm_wrapper_with_the_tokens_it_needs(tiny_bert_dir, tmp_path):
    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text(json.dumps(OPT))
    out = tmp_path / "random-opt"
    recipe = RandomWeights(str(tmp_path / "opt"), str(tiny_bert_dir), special_tokens={"eos_token": "[SEP]"})
    llm = CausalLM(str(out), build_if_missing=recipe)  # built because the path is missing, then loaded
    assert isinstance(llm.model, transformers.OPTForCausalLM)
    assert llm.model.config.hidden_size == 16 and llm.tokenizer.eos_token == "[SEP]"
    weights = llm.model.get_input_embeddings().weight
    assert weights.std() > 0.005  # initialised, not zeros
    again = RandomWeights(str(tmp_path / "opt"), str(tiny_bert_dir), special_tokens={"eos_token": "[SEP]"})
    again.build(tmp_path / "second")  # the same seed gives the same weights
    second = transformers.OPTForCausalLM.from_pretrained(tmp_path / "second")
    assert torch.equal(second.get_input_embeddings().weight, weights)


def test_a_tokenizer_larger_than_the_vocabulary_and_a_missing_config_stop_with_one_line(tiny_bert_dir, tmp_path):
    small = {**OPT, "vocab_size": 4}
    (tmp_path / "config.json").write_text(json.dumps(small))
    with pytest.raises(ConfigError, match="more than the 4 rows"):
        RandomWeights(str(tmp_path / "config.json"), str(tiny_bert_dir)).build(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"is not a config\.json"):
        RandomWeights(str(tmp_path / "nothing"), str(tiny_bert_dir))


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("opt-2.7b", transformers.OPTForCausalLM, 2_651_596_800),  # facebook/opt-2.7b
        ("bert-base-uncased", transformers.BertForMaskedLM, 109_514_298),  # with its MLM head
        ("flan-t5-xl", transformers.T5ForConditionalGeneration, 2_849_757_184),  # google/flan-t5-xl
    ],
)
def test_the_shipped_paper_model_configs_have_the_papers_sizes(name, cls, expected):
    config = transformers.AutoConfig.from_pretrained(REPO / "configs" / "models" / name)
    with torch.device("meta"):  # no memory: shapes only
        model = cls(config)
    if name == "flan-t5-xl" and model.lm_head.weight is model.shared.weight:
        expected -= 32128 * 2048  # transformers 5 ties T5's output head to the embedding, which Flan-T5 does not
    assert sum(p.numel() for p in model.parameters()) == expected
