"""Q-Former: BERT initialisation, cross-attention placement, the three attention masks, Hugging Face parity."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForMaskedLM, BertModel

from vlgen.bridges import QFormer
from vlgen.bridges.qformer import attention_bias
from vlgen.errors import ConfigError

VISION, LLM, QUERIES = 16, 24, 4
TEXTS = ["a red circle above a square", "the small blue triangle"]


def make(bert_dir, llm_dim: int | None = LLM, **kwargs) -> QFormer:
    kwargs = {"num_queries": QUERIES, "text_input": True, **kwargs}
    q = QFormer(str(bert_dir), **kwargs)
    q.build(VISION, llm_dim)
    return q.eval()


@pytest.fixture(scope="module")
def qformer(tiny_bert_dir) -> QFormer:
    torch.manual_seed(0)
    return make(tiny_bert_dir)


@pytest.fixture(scope="module")
def bert(tiny_bert_dir) -> BertForMaskedLM:
    return BertForMaskedLM.from_pretrained(tiny_bert_dir).eval()


def inputs(q: QFormer, batch: int = 2):
    torch.manual_seed(1)
    ids, att = q.tokenize(TEXTS[:batch], 10)
    return torch.randn(batch, 5, VISION), ids, att


def test_shapes(qformer):
    x, ids, att = inputs(qformer)
    out = qformer(x)
    assert out.prompts.shape == (2, QUERIES, LLM) and out.mask is None
    assert qformer.query_features(x).shape == (2, QUERIES, 32)
    assert qformer.text_features(ids, att).shape == (2, 10, 32)
    assert qformer.joint(x, None, ids, att).shape == (2, QUERIES + 10, 32)
    assert qformer.itg_logits(x, None, ids, att).shape == (2, 10, len(qformer.tokenizer))


def test_stage1_build_without_llm_returns_query_outputs(tiny_bert_dir):
    q = make(tiny_bert_dir, llm_dim=None)
    x = torch.randn(2, 5, VISION)
    assert q.language_projection is None
    torch.testing.assert_close(q(x).prompts, q.query_features(x))


@pytest.mark.parametrize("frequency, expected", [(1, [0, 1]), (2, [0]), (3, [0])])
def test_cross_attention_every_frequency_layers_with_vision_width(tiny_bert_dir, frequency, expected):
    q = make(tiny_bert_dir, cross_attention_frequency=frequency)
    assert [i for i, layer in enumerate(q.layers) if layer.crossattention is not None] == expected
    for i in expected:
        attn = q.layers[i].crossattention.attention
        assert attn.key.in_features == attn.value.in_features == VISION and attn.query.in_features == 32


def test_bert_weights_are_copied(qformer, bert):
    theirs = bert.state_dict()
    assert qformer.bert_keys  # every copied tensor really equals BERT's
    for ours, key in qformer.bert_keys.items():
        value = qformer.state_dict()[ours]
        torch.testing.assert_close(value[: theirs[key].shape[0]], theirs[key], rtol=0, atol=0)
    copied = set(qformer.bert_keys)
    for i in range(2):
        prefix = f"qformer.encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.output.LayerNorm", "intermediate", "output_query"):
            assert any(k.startswith(prefix + name) for k in copied), prefix + name
        assert not any(k.startswith(prefix + "crossattention") for k in copied)  # fresh
    assert {"embeddings.word_embeddings.weight", "qformer.layernorm.weight", "cls.predictions.bias"} <= copied
    assert "query_tokens" not in copied


def test_query_ffn_starts_as_the_bert_ffn(qformer, bert):
    for i, layer in enumerate(qformer.layers):
        src = bert.bert.encoder.layer[i]
        for ours in (layer.intermediate, layer.intermediate_query):
            torch.testing.assert_close(ours.dense.weight, src.intermediate.dense.weight, rtol=0, atol=0)
        for ours in (layer.output, layer.output_query):
            torch.testing.assert_close(ours.dense.weight, src.output.dense.weight, rtol=0, atol=0)
            torch.testing.assert_close(ours.LayerNorm.bias, src.output.LayerNorm.bias, rtol=0, atol=0)


def test_dec_token_added_and_lm_decoder_tied_to_embeddings(qformer, bert):
    tok = qformer.tokenizer
    assert tok.bos_token == "[DEC]" and len(tok) == bert.config.vocab_size + 1
    assert qformer.embeddings["word_embeddings"].weight.shape[0] == len(tok)
    x, ids, att = inputs(qformer)
    hidden = qformer.encode(x, None, ids, att, attn="causal")[:, QUERIES:]
    ids[:, 0] = tok.bos_token_id
    hidden_dec = qformer.encode(x, None, ids, att, attn="causal")[:, QUERIES:]
    expected = qformer.cls.predictions.transform(hidden_dec) @ qformer.embeddings["word_embeddings"].weight.T
    torch.testing.assert_close(qformer.itg_logits(x, None, ids, att), expected + qformer.cls.predictions.bias)
    assert not torch.allclose(hidden, hidden_dec)  # [CLS] really was replaced by [DEC]


def test_num_layers_keeps_the_first_bert_layers(tiny_bert_dir, bert):
    q = make(tiny_bert_dir, num_layers=1)
    assert len(q.layers) == 1
    torch.testing.assert_close(
        q.layers[0].attention.attention.value.weight, bert.bert.encoder.layer[0].attention.self.value.weight
    )


def test_text_path_is_bert(qformer, tiny_bert_dir):
    # BERT adds token-type embedding 0, which the Q-Former (like LAVIS) does not load; zero it to compare.
    base = BertModel.from_pretrained(tiny_bert_dir).eval()
    with torch.no_grad():
        base.embeddings.token_type_embeddings.weight.zero_()
    _, ids, att = inputs(qformer)
    expected = base(input_ids=ids, attention_mask=att).last_hidden_state
    real = att.bool()
    torch.testing.assert_close(qformer.text_features(ids, att)[real], expected[real], rtol=1e-4, atol=1e-5)


def test_attention_bias_patterns():
    text_mask = torch.tensor([[1, 1, 0]])
    allowed = {a: attention_bias(2, text_mask, 1, a, torch.float32)[0, 0] == 0 for a in ("unimodal", "causal")}
    q, t = [True, True, False, False, False], [False, False, True, True, False]
    assert allowed["unimodal"].tolist() == [q, q, t, t, t]
    assert allowed["causal"].tolist() == [
        q,
        q,
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, False],  # a padded row still sees real keys only
    ]
    both = attention_bias(2, text_mask, 1, "bidirectional", torch.float32)[0, 0] == 0
    assert both.tolist() == [[True, True, True, True, False]] * 5


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-6)


def test_unimodal_mask_separates_queries_and_text(qformer):
    x, ids, att = inputs(qformer)
    out = qformer.encode(x, None, ids, att, attn="unimodal")
    torch.testing.assert_close(out[:, :QUERIES], qformer.query_features(x))
    torch.testing.assert_close(out[:, QUERIES:], qformer.text_features(ids, att))
    other_ids = ids.clone()
    other_ids[:, 1:3] = 7
    out2 = qformer.encode(torch.randn_like(x), None, other_ids, att, attn="unimodal")
    assert _changed(out[:, :QUERIES], out2[:, :QUERIES])  # the image changed...
    out3 = qformer.encode(x, None, other_ids, att, attn="unimodal")
    torch.testing.assert_close(out3[:, :QUERIES], out[:, :QUERIES])  # ...but the text does not reach the queries
    out4 = qformer.encode(torch.randn_like(x), None, ids, att, attn="unimodal")
    torch.testing.assert_close(out4[:, QUERIES:], out[:, QUERIES:])  # nor the image the text


def test_bidirectional_mask_mixes_both_ways(qformer):
    x, ids, att = inputs(qformer)
    out = qformer.joint(x, None, ids, att)
    other_ids = ids.clone()
    other_ids[:, 2] = 7
    assert _changed(out[:, :QUERIES], qformer.joint(x, None, other_ids, att)[:, :QUERIES])
    assert _changed(out[:, QUERIES:], qformer.joint(torch.randn_like(x), None, ids, att)[:, QUERIES:])


def test_causal_mask_queries_ignore_text_and_text_sees_only_the_past(qformer):
    x, ids, att = inputs(qformer)
    out = qformer.encode(x, None, ids, att, attn="causal")
    t = 2  # change the text token at t + 1
    other_ids = ids.clone()
    other_ids[:, t + 1] = 7 if ids[0, t + 1] != 7 else 8
    out2 = qformer.encode(x, None, other_ids, att, attn="causal")
    torch.testing.assert_close(out2[:, :QUERIES], out[:, :QUERIES])
    torch.testing.assert_close(out2[:, QUERIES : QUERIES + t + 1], out[:, QUERIES : QUERIES + t + 1])
    assert _changed(out2[:, QUERIES + t + 1], out[:, QUERIES + t + 1])
    x2 = x.clone()
    x2[:, 3] = torch.randn(VISION)  # one image token changes: every text position sees it through the queries
    out3 = qformer.encode(x2, None, ids, att, attn="causal")
    assert all(_changed(out3[:, QUERIES + i], out[:, QUERIES + i]) for i in range(ids.shape[1]))


def test_vision_mask_hides_padded_tokens(qformer):
    x = torch.randn(2, 5, VISION)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x2 = x.clone()
    x2[0, 3:] = 100.0
    torch.testing.assert_close(qformer.query_features(x2, mask)[0], qformer.query_features(x, mask)[0])
    torch.testing.assert_close(qformer.query_features(x, mask)[0], qformer.query_features(x[:1, :3])[0])


def test_frozen_trains_only_the_projection(tiny_bert_dir):
    q = make(tiny_bert_dir, frozen=True)
    q.train()
    trainable = {n for n, p in q.named_parameters() if p.requires_grad}
    assert trainable == {"language_projection.weight", "language_projection.bias"}
    assert not q.qformer.training and q.language_projection.training


def test_captioning_bridge_has_no_text_path(tiny_bert_dir):
    q = make(tiny_bert_dir, text_input=False)
    keys = set(q.state_dict())
    assert not any(k.startswith(("embeddings.", "cls.")) or ".intermediate." in k for k in keys)
    assert q.tokenizer is None and q(torch.randn(1, 5, VISION)).prompts.shape == (1, QUERIES, LLM)
    with pytest.raises(ConfigError, match="text_input"):
        q.tokenize(["a"], 4)


def test_config_errors_name_the_option(tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"bridge\.bert"):
        QFormer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"bridge\.num_layers"):
        QFormer(str(tiny_bert_dir), num_layers=5)
    with pytest.raises(RuntimeError, match="build"):
        QFormer(str(tiny_bert_dir)).query_features(torch.randn(1, 5, VISION))


def test_matches_hugging_face_blip2_qformer(tiny_bert_dir):
    """Same names and shapes as transformers' Blip2QFormerModel; same query outputs once its weights are loaded."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    q = make(tiny_bert_dir, text_input=False, vision_norm=False)
    config = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=VISION,
        cross_attention_frequency=2,
        vocab_size=q.config.vocab_size,
    )
    hf = Blip2QFormerModel(config).eval()
    ours = {k.removeprefix("qformer."): v for k, v in q.state_dict().items() if k.startswith("qformer.")}
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    hf.load_state_dict(ours)
    x = torch.randn(2, 5, VISION)
    expected = hf(query_embeds=q.query_tokens.expand(2, -1, -1), encoder_hidden_states=x).last_hidden_state
    torch.testing.assert_close(q.query_features(x), expected, rtol=1e-4, atol=1e-5)
