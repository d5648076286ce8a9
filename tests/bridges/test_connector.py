"""EVLGen's token-merging connector: BERT parity without merging, token counts, padding, the ramp, and the MergeRamp
callback (its contrastive term is an objective: tests/objectives/test_contrast.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel

from vlgen.bridges import TokenMergingConnector
from vlgen.callbacks import MergeRamp
from vlgen.errors import ConfigError

VISION, LLM = 16, 24


def make(**kwargs) -> TokenMergingConnector:
    torch.manual_seed(0)
    kwargs = {"num_layers": 3, "r": 4, "hidden_size": 32, "num_heads": 2, "dropout": 0.0, **kwargs}
    c = TokenMergingConnector(**kwargs)
    c.build(VISION, LLM)
    return c.eval()


def test_without_merging_the_layers_are_berts(tiny_bert_dir):
    connector = make(bert=str(tiny_bert_dir), num_layers=2, r=0, vision_norm=False)
    bert = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    tokens = torch.randn(2, 9, VISION)
    ours = connector(tokens)
    theirs = bert(inputs_embeds=connector.input_proj(tokens)).last_hidden_state
    torch.testing.assert_close(ours.prompts, connector.projection(theirs), atol=1e-5, rtol=1e-5)
    assert ours.prompts.shape == (2, 9, LLM)


def test_token_counts_follow_the_schedule():
    connector = make()
    out = connector(torch.randn(2, 33, VISION))
    assert out.prompts.shape == (2, 33 - 3 * 4, LLM) and out.mask is None
    assert connector.prompt_count(33) == 21
    assert make(r=[8, 4, 0]).prompt_count(33) == 21
    assert make(r=[16, 16, 16]).prompt_count(33) == 33 - 16 - 8 - 4  # capped at half the mergeable tokens
    assert out.pooled is not None and out.pooled.shape == (2, 32)


def test_first_token_is_protected_and_gradients_reach_the_inputs():
    connector = make(r=6)
    tokens = torch.randn(2, 17, VISION, requires_grad=True)
    out = connector(tokens)
    out.prompts.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert connector.input_proj.weight.grad is not None


def test_padded_samples_get_what_they_get_alone():
    connector = make(r=3, proportional_attention=True)
    torch.manual_seed(2)
    short, long = torch.randn(1, 12, VISION), torch.randn(1, 16, VISION)
    padded = torch.cat([short, 100 * torch.randn(1, 4, VISION)], dim=1)  # garbage where the mask says padding
    mask = torch.tensor([[1] * 12 + [0] * 4, [1] * 16])
    both = connector(torch.cat([padded, long]), mask)
    alone = [connector(short), connector(long)]
    assert both.mask is not None and torch.isfinite(both.prompts).all()
    for i, single in enumerate(alone):
        real = both.prompts[i][both.mask[i].bool()]
        torch.testing.assert_close(real, single.prompts[0], atol=1e-5, rtol=1e-5)


def test_ramp_fraction_scales_every_layer():
    connector = make(r=4)
    connector.merge_fraction = 0.0
    assert connector(torch.randn(1, 33, VISION)).prompts.shape[1] == 33
    connector.merge_fraction = 0.5
    assert connector.schedule(33) == [2, 2, 2]
    assert MergeRamp(100).fraction(0) == 0.0 and MergeRamp(100).fraction(50) == 0.5
    assert MergeRamp(100).fraction(500) == 1.0 and MergeRamp(0).fraction(0) == 1.0


def test_bad_settings_are_named(tiny_bert_dir):
    with pytest.raises(ConfigError, match=r"bridge\.num_layers"):
        TokenMergingConnector(bert=str(tiny_bert_dir), num_layers=5)
    with pytest.raises(ConfigError, match=r"bridge\.bert"):
        TokenMergingConnector(bert="./no/such/bert")
    with pytest.raises(ConfigError, match=r"MergeRamp\.steps"):
        MergeRamp(-1)
    with pytest.raises(ConfigError, match=r"bridge\.r: per-layer r has 4 entries but num_layers is 3"):
        make(r=[4, 4, 4, 4])


def test_a_schedule_string_arrives_from_yaml_and_the_command_line():
    """jsonargparse reads ``r`` as the connector's annotation says: ``"4:-1"`` stays the schedule string, a list the
    per-layer values, a plain number an int."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TokenMergingConnector, "bridge")
    for given, read in (("4:-1", "4:-1"), ("[4, 2, 1]", [4, 2, 1]), ("19", 19)):
        assert parser.parse_args(["--bridge.r", given]).bridge.r == read
    assert make(r="4:-1").r == "4:-1"


def test_unweighted_merging_differs_only_once_sizes_differ():
    tokens = torch.randn(2, 17, VISION)
    for layers, same in ((1, True), (3, False)):
        weighted = make(num_layers=layers, r=4)(tokens).prompts
        plain = make(num_layers=layers, r=4, size_weighted=False)(tokens).prompts
        assert torch.allclose(weighted, plain, atol=1e-6) is same
