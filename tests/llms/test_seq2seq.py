"""Seq2SeqLM: loss parity with the HF model, masks and padding, truncation, prefix-LM, generation, freezing, errors,
and the Captioner driving it unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlgen.bridges import LinearProjector
from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError
from vlgen.llms import Decoding, Seq2SeqLM
from vlgen.models import Captioner

D = 32  # the tiny T5's d_model


@pytest.fixture(scope="module")
def lm(tiny_t5_dir):
    return Seq2SeqLM(str(tiny_t5_dir), decoding=Decoding(max_new_tokens=6))


def manual_logits(lm: Seq2SeqLM, prompts: torch.Tensor, prefix: str, decoder_ids: list[int]) -> torch.Tensor:
    """Decoder logits ``[T, V]`` straight from the HF model for one sample: encoder = [prompts][tokenizer(prefix)]."""
    model = lm.model
    parts = [prompts]
    if prefix:
        ids = torch.tensor([lm.tokenizer(prefix).input_ids])
        parts.append(model.get_input_embeddings()(ids))
    start = model.config.decoder_start_token_id
    out = model(inputs_embeds=torch.cat(parts, 1), decoder_input_ids=torch.tensor([[start, *decoder_ids]]))
    return out.logits[0]


def manual_loss(lm: Seq2SeqLM, prompts: torch.Tensor, prefix: str, target: str) -> torch.Tensor:
    tok = lm.tokenizer
    labels = [*tok(target, add_special_tokens=False).input_ids, tok.eos_token_id]
    logits = manual_logits(lm, prompts, prefix, labels[:-1])  # decoder input: start + labels shifted right
    return F.cross_entropy(logits, torch.tensor(labels))


def test_frozen_by_default_and_stays_in_eval(lm):
    assert lm.hidden_size == D
    assert not any(p.requires_grad for p in lm.parameters())
    lm.train()
    assert not lm.model.training
    lm.eval()


def test_tokenizer_closes_text_with_eos_like_t5(lm):
    ids = lm.tokenizer("a photo of").input_ids
    assert ids[-1] == lm.tokenizer.eos_token_id and len(ids) == 4


@pytest.mark.parametrize("prefix", ["a photo of", ""])
def test_loss_matches_manual_cross_entropy_on_target_tokens(lm, prefix):
    torch.manual_seed(0)
    prompts = torch.randn(1, 3, D)
    loss = lm.loss(prompts, None, [prefix], ["a red circle"])
    assert torch.allclose(loss, manual_loss(lm, prompts, prefix, "a red circle"), atol=1e-5)


def test_loss_of_a_sample_does_not_depend_on_its_batch_neighbours(lm):
    torch.manual_seed(1)
    prompts = torch.randn(3, 4, D)
    prefixes = ["a photo of", "question what colour is the circle short answer", ""]
    targets = ["a red circle", "a small blue square to the left of a large green triangle", "red"]
    both = lm.loss(prompts, None, prefixes, targets)
    singles = [lm.loss(prompts[i : i + 1], None, [prefixes[i]], [targets[i]]) for i in range(3)]
    n = [len(t.split()) + 1 for t in targets]  # word-level tokenizer: one token per word, plus eos
    weighted = sum(s * k for s, k in zip(singles, n, strict=True)) / sum(n)  # token-level mean over the batch
    assert torch.allclose(both, weighted, atol=1e-5)


def test_masked_prompts_are_ignored(lm):
    torch.manual_seed(2)
    prompts = torch.randn(1, 4, D)
    mask = torch.tensor([[1, 1, 1, 0]])
    changed = prompts.clone()
    changed[0, 3] = 100.0
    a = lm.loss(prompts, mask, ["a photo of"], ["a red circle"])
    b = lm.loss(changed, mask, ["a photo of"], ["a red circle"])
    c = lm.loss(changed, None, ["a photo of"], ["a red circle"])
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_targets_and_prefixes_are_truncated_keeping_special_tokens(tiny_t5_dir, lm):
    short = Seq2SeqLM(str(tiny_t5_dir), max_target_tokens=2, max_prefix_tokens=3)
    prompts = torch.randn(1, 2, D)
    truncated = short.loss(prompts, None, ["a photo of the"], ["a red circle"])
    assert torch.allclose(truncated, manual_loss(lm, prompts, "a photo", "a red"), atol=1e-5)


def test_gradient_reaches_prompts_not_weights(lm):
    prompts = torch.randn(2, 3, D, requires_grad=True)
    lm.loss(prompts, None, ["a photo of", ""], ["a red circle", "two blue squares"]).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())


def test_greedy_generation_follows_the_decoder_argmax(lm):
    torch.manual_seed(3)
    prompts = torch.randn(2, 3, D)
    exact = Decoding(max_new_tokens=3, min_new_tokens=3)
    lm.decoding, default = exact, lm.decoding
    try:
        generated = lm.generate(prompts, None, ["a photo of"] * 2)
    finally:
        lm.decoding = default
    eos = lm.tokenizer.eos_token_id
    for i in range(2):
        ids: list[int] = []
        for _ in range(3):  # min_new_tokens forbids eos until the end
            logits = manual_logits(lm, prompts[i : i + 1], "a photo of", ids)[-1]
            logits[eos] = -float("inf")
            ids.append(int(logits.argmax()))
        assert generated[i] == lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    first = int(manual_logits(lm, prompts[:1], "a photo of", [])[-1].argmax())
    one = lm.generate(prompts[:1], None, ["a photo of"])  # default decoding: may stop at once
    assert one[0].split()[:1] == lm.tokenizer.decode([first], skip_special_tokens=True).split()


def test_batched_generation_is_deterministic_and_equals_one_by_one(tiny_t5_dir):
    lm = Seq2SeqLM(str(tiny_t5_dir), decoding=Decoding(max_new_tokens=4, min_new_tokens=4))
    torch.manual_seed(4)
    prompts = torch.randn(3, 4, D)
    prefixes = ["a photo of", "question what colour is the circle short answer", ""]
    batched = lm.generate(prompts, None, prefixes)
    assert len(batched) == 3 and any(batched)  # a random LM may also pick <unk> or <pad>, dropped when decoding
    assert lm.generate(prompts, None, prefixes) == batched
    assert batched == [lm.generate(prompts[i : i + 1], None, [prefixes[i]])[0] for i in range(3)]


def test_prefix_lm_split_keeps_every_word_and_at_least_one_target_word(tiny_t5_dir):
    plm = Seq2SeqLM(str(tiny_t5_dir), prefix_lm=True)
    words = "a small blue square to the left".split()
    heads = set()
    for _ in range(30):
        prefix, target = plm._split("a photo of", " ".join(words))
        head = prefix.split()[3:]
        assert prefix.startswith("a photo of") and target and head + target.split() == words
        heads.add(len(head))
    assert len(heads) > 1  # the split point varies
    assert plm._split("", "red") == ("", "red")


def test_prefix_lm_loss_is_a_seeded_split_in_training_and_the_whole_caption_in_eval(tiny_t5_dir, lm):
    words = "a small blue square".split()
    caption = " ".join(words)
    prompts = torch.randn(1, 2, D)
    candidates = [
        lm.loss(prompts, None, [" ".join(["a photo of", *words[:k]])], [" ".join(words[k:])]) for k in range(len(words))
    ]
    runs = []
    for _ in range(2):
        plm = Seq2SeqLM(str(tiny_t5_dir), prefix_lm=True, prefix_lm_seed=7).train()
        runs.append(torch.stack([plm.loss(prompts, None, ["a photo of"], [caption]) for _ in range(5)]))
    assert all(any(torch.allclose(x, c, atol=1e-5) for c in candidates) for x in runs[0])
    assert torch.equal(runs[0], runs[1])  # same seed, same splits
    plm.eval()  # evaluation sees the whole caption as the target
    assert torch.allclose(plm.loss(prompts, None, ["a photo of"], [caption]), candidates[0], atol=1e-5)


def test_missing_local_path_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"llm.name_or_path: .*nope does not exist"):
        Seq2SeqLM(str(tmp_path / "nope"))


def test_captioner_trains_the_bridge_and_captions_with_it(tiny_t5_dir):
    vit = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=vit)
    model = Captioner(enc, LinearProjector(), Seq2SeqLM(str(tiny_t5_dir), decoding=Decoding(max_new_tokens=4)))
    model.log = lambda *a, **k: None  # no trainer attached
    batch = {
        "pixels": torch.randn(2, 3, 32, 32),
        "captions": ["a red circle", "two blue squares"],
        "references": [["a red circle"], ["two blue squares"]],
        "ids": ["0", "1"],
        "num_skipped": 0,
    }
    loss = model.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.bridge.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    out = model.caption(torch.randn(3, 3, 32, 32))
    assert len(out) == 3 and all(isinstance(c, str) for c in out)


def test_weighted_loss_is_the_weighted_mean_of_each_samples_own_loss(lm):
    torch.manual_seed(2)
    prompts = torch.randn(3, 4, D)
    prefix, targets = "question what colour is the circle short answer", ["red", "a red circle", "two"]
    singles = torch.stack([lm.loss(prompts[i : i + 1], None, [prefix], [targets[i]]) for i in range(3)])
    weights = torch.tensor([0.7, 0.2, 0.1])
    weighted = lm.loss(prompts, None, [prefix] * 3, targets, weights)
    assert torch.allclose(weighted, (weights * singles).sum(), atol=1e-5)  # the weights sum to 1


def test_a_given_decoding_replaces_the_models_own(tiny_t5_dir):
    lm = Seq2SeqLM(str(tiny_t5_dir), decoding=Decoding(max_new_tokens=4, min_new_tokens=4))
    torch.manual_seed(5)
    prompts = torch.randn(2, 4, D)
    prefixes = ["question what colour is the circle short answer"] * 2
    own = lm.generate(prompts, None, prefixes)
    short = lm.generate(prompts, None, prefixes, Decoding(max_new_tokens=1, min_new_tokens=1))
    assert lm.decoding.max_new_tokens == 4  # untouched
    for full, one in zip(own, short, strict=True):
        assert len(one.split()) <= 1 and full.startswith(one)  # word-level tokenizer: one word at most, greedy
