"""load_checked: required keys, shape checks, partial loads, and the one-line summary of what came from where."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vlgen.errors import ConfigError
from vlgen.loading import load_checked, rename_keys


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))  # keys 0.weight [4, 3], 0.bias, 1.weight, 1.bias [4]


def source(module: nn.Module, value: float = 7.0) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in module.state_dict().items()}


def one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_full_load_copies_every_tensor():
    module = tiny()
    done = load_checked(module, source(module), "x.init_from", "a.ckpt")
    assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in module.state_dict().values())
    assert done.loaded == list(module.state_dict()) and done.fresh == [] and done.unused == []


def test_a_missing_required_key_stops_with_one_line_naming_the_option_and_the_key():
    module = tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = source(module)
    del state["1.bias"]
    with pytest.raises(ConfigError) as err:
        load_checked(module, state, "bridge.init_from", "stage1.ckpt", label="Q-Former")
    text = one_line(err)
    assert text.startswith("bridge.init_from: stage1.ckpt lacks 1 Q-Former weights")
    assert "'1.bias'" in text
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("required", [["0.weight"], lambda k: k.startswith("0.")])
def test_required_can_be_keys_or_a_predicate(required):
    module = tiny()
    state = {k: v for k, v in source(module).items() if k.startswith("0.")}
    done = load_checked(module, state, "opt", "src", required=required)
    assert done.loaded == ["0.weight", "0.bias"] and done.fresh == ["1.weight", "1.bias"]
    with pytest.raises(ConfigError, match=r"opt: src lacks 1 weights, e.g. \['0.weight'\]"):
        load_checked(tiny(), {"0.bias": state["0.bias"]}, "opt", "src", required=required)


def test_a_shape_mismatch_names_the_option_the_key_both_shapes_and_the_source():
    module = tiny()
    state = source(module) | {"0.weight": torch.zeros(5, 3)}
    with pytest.raises(ConfigError) as err:
        load_checked(module, state, "pformer.init_from", "/runs/stage0.ckpt", hint="check num_prompts")
    assert one_line(err) == (
        "pformer.init_from: 0.weight is (5, 3) in /runs/stage0.ckpt, (4, 3) here (check num_prompts)"
    )


def test_a_partial_load_leaves_the_other_weights_untouched_and_reports_them(caplog):
    module = tiny()
    fresh_before = module[1].weight.detach().clone()
    state = {"0.weight": torch.ones(4, 3), "0.bias": torch.ones(4)}
    with caplog.at_level(logging.INFO, logger="vlgen.loading"):
        done = load_checked(module, state, "model.init_from", "image.ckpt", required="any")
    assert torch.equal(module[0].weight, torch.ones(4, 3)) and torch.equal(module[0].bias, torch.ones(4))
    assert torch.equal(module[1].weight, fresh_before)  # untouched
    assert done.loaded == ["0.weight", "0.bias"] and done.fresh == ["1.weight", "1.bias"] and done.unused == []
    [record] = [r for r in caplog.records if r.name == "vlgen.loading"]  # logged once
    assert record.getMessage() == (
        "model.init_from: 2 tensors loaded from image.ckpt; 2 fresh: 1.weight, 1.bias; 0 unused: none"
    )


def test_frozen_parameters_are_not_reported_fresh():
    module = tiny()
    module[1].requires_grad_(False)  # kept as built (e.g. a frozen LLM), not fresh
    done = load_checked(module, {"0.weight": torch.ones(4, 3)}, "opt", "src", required="any")
    assert done.fresh == ["0.bias"]


def test_unused_source_keys_are_reported(caplog):
    module = tiny()
    state = source(module) | {"head.weight": torch.zeros(2), "extra.bias": torch.zeros(1)}
    with caplog.at_level(logging.INFO, logger="vlgen.loading"):
        done = load_checked(module, state, "opt", "src", label="P-Former", also_unused=["bert.pooler.dense.weight"])
    assert done.unused == ["bert.pooler.dense.weight", "extra.bias", "head.weight"]
    message = caplog.records[-1].getMessage()
    assert message.startswith("P-Former: 4 tensors loaded from src; 0 fresh: none; 3 unused: ")
    assert "extra.bias" in message and "head.weight" in message and "bert.pooler.dense.weight" in message


def test_any_needs_at_least_one_shared_key():
    with pytest.raises(ConfigError, match=r"^model.init_from: other.ckpt holds none of this model's weights$"):
        load_checked(tiny(), {"something.else": torch.zeros(1)}, "model.init_from", "other.ckpt", required="any")


def test_skip_mismatched_keys_stay_fresh_and_are_reported_unused_unless_required():
    module = tiny()
    before = module[1].bias.detach().clone()
    state = source(module) | {"1.bias": torch.zeros(9)}
    optional = lambda k: k.startswith("1.")  # noqa: E731
    done = load_checked(module, state, "opt", "src", required=lambda k: not optional(k), skip_mismatched=optional)
    assert torch.equal(module[1].bias, before) and torch.equal(module[1].weight, torch.full((4,), 7.0))
    assert done.unused == ["1.bias"] and done.fresh == ["1.bias"]
    with pytest.raises(ConfigError, match=r"1.bias is \(9,\) in src, \(4,\) here"):
        load_checked(tiny(), state, "opt", "src", skip_mismatched=optional)  # required (all) wins


def test_rename_keys_applies_a_key_map_and_drops_what_it_maps_to_none():
    state = {"qformer.a": torch.zeros(1), "vision.b": torch.ones(1)}
    out = rename_keys(state, lambda k: k.removeprefix("qformer.") if k.startswith("qformer.") else None)
    assert list(out) == ["a"] and out["a"] is state["qformer.a"]


def test_the_key_maps_of_each_source_format():
    from vlgen.bridges.pformer import stage0_key_to_pformer
    from vlgen.bridges.qformer_weights import bert_key_of, blip2_key_to_qformer, stage1_key_to_qformer

    assert (
        bert_key_of("qformer.encoder.layer.1.output_query.dense.weight") == "bert.encoder.layer.1.output.dense.weight"
    )
    assert bert_key_of("qformer.layernorm.bias") == "bert.embeddings.LayerNorm.bias"
    assert bert_key_of("qformer.encoder.layer.0.crossattention.attention.key.weight") is None  # fresh
    assert blip2_key_to_qformer("query_tokens", vision_norm=True) == "query_tokens"
    assert blip2_key_to_qformer("vision_model.post_layernorm.weight", vision_norm=True) == "ln_vision.weight"
    assert blip2_key_to_qformer("vision_model.post_layernorm.weight", vision_norm=False) is None
    assert blip2_key_to_qformer("language_model.lm_head.weight", vision_norm=True) is None
    assert stage1_key_to_qformer("qformer.query_tokens") == "query_tokens"
    assert stage1_key_to_qformer("itm_head.weight") is None
    assert stage0_key_to_pformer("pformer.llm_proj.weight") == "llm_proj.weight"
    assert stage0_key_to_pformer("contrastive.temp") is None
