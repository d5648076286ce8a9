"""CausalLM: loss masking, padding independence, batched generation, freezing, loading errors."""

from __future__ import annotations

import pytest
import torch

from vlgen.errors import ConfigError
from vlgen.llms import CausalLM, Decoding


@pytest.fixture(scope="module")
def llm(tiny_llm_dir):
    return CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=6))


def test_frozen_by_default(llm):
    assert llm.hidden_size == 64
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert not llm.model.training  # a frozen LM stays in eval mode


def test_loss_matches_manual_cross_entropy_on_target_tokens_only(llm):
    torch.manual_seed(0)
    prompts = torch.randn(1, 3, 64)
    loss = llm.loss(prompts, None, ["a photo of"], ["a red circle"])
    tok = llm.tokenizer
    prefix = tok("a photo of").input_ids
    target = [*tok(" a red circle", add_special_tokens=False).input_ids, tok.eos_token_id]
    ids = torch.tensor([prefix + target])
    embeds = torch.cat([prompts, llm.model.get_input_embeddings()(ids)], 1)
    logits = llm.model(inputs_embeds=embeds).logits[0]
    start = 3 + len(prefix)  # first target position
    manual = torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(target))
    assert torch.allclose(loss, manual, atol=1e-5)


def test_loss_of_a_sample_does_not_depend_on_its_batch_neighbours(llm):
    torch.manual_seed(1)
    prompts = torch.randn(2, 3, 64)
    captions = ["a red circle", "a small blue square to the left of a large green triangle"]
    both = llm.loss(prompts, None, ["a photo of"] * 2, captions)
    singles = [llm.loss(prompts[i : i + 1], None, ["a photo of"], [captions[i]]) for i in range(2)]
    n = [len(llm._target_ids("a photo of", c)) for c in captions]
    weighted = (singles[0] * n[0] + singles[1] * n[1]) / sum(n)  # token-level mean over the batch
    assert torch.allclose(both, weighted, atol=1e-5)


def manual_loss(llm, prompts, prefixes, targets):
    """Cross-entropy over every target token from full-sequence logits, one sample at a time, no shortcuts."""
    total, count = 0.0, 0
    for i, (prefix, target) in enumerate(zip(prefixes, targets)):
        p, t = llm._prefix_ids(prefix), llm._target_ids(prefix, target)
        embeds = torch.cat([prompts[i : i + 1], llm.model.get_input_embeddings()(torch.tensor([p + t]))], 1)
        logits = llm.model(inputs_embeds=embeds).logits[0]  # [M + len(p) + len(t), V]
        start = prompts.shape[1] + len(p)  # first target position
        total = total + torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(t), reduction="sum")
        count += len(t)
    return total / count


@pytest.mark.parametrize(
    "prefixes",
    [["a photo of", "question what colour is the circle short answer"], ["", ""], ["", "a photo of"]],
    ids=["two-prefix-lengths", "no-prefix", "mixed"],
)
def test_loss_covers_every_target_token_whatever_the_prefixes(llm, prefixes):
    torch.manual_seed(3)
    prompts = torch.randn(2, 3, 64)
    targets = ["a red circle", "two blue squares above a green triangle"]
    expected = manual_loss(llm, prompts, prefixes, targets)
    assert torch.allclose(llm.loss(prompts, None, prefixes, targets), expected, atol=1e-5)


def test_gradient_reaches_prompts_not_weights(llm):
    prompts = torch.randn(2, 3, 64, requires_grad=True)
    llm.loss(prompts, None, ["a photo of"] * 2, ["a red circle", "two blue squares"]).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())


def test_batched_generation_equals_one_by_one_with_different_prefix_lengths(llm):
    torch.manual_seed(2)
    prompts = torch.randn(3, 4, 64)
    prefixes = ["a photo of", "question what colour is the circle short answer", ""]
    batched = llm.generate(prompts, None, prefixes)
    single = [llm.generate(prompts[i : i + 1], None, [prefixes[i]])[0] for i in range(3)]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)


def test_beam_search_and_length_limits(tiny_llm_dir):
    lm = CausalLM(str(tiny_llm_dir), decoding=Decoding(num_beams=3, max_new_tokens=5, min_new_tokens=5))
    out = lm.generate(torch.randn(2, 2, 64), None, ["a photo of"] * 2)
    # word-level tokenizer: one generated token per word (eos suppressed until min length)
    assert [len(s.split()) for s in out] == [5, 5]


def test_missing_local_path_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"llm.name_or_path: .*nope does not exist"):
        CausalLM(str(tmp_path / "nope"))


def test_unknown_package_is_named():
    with pytest.raises(ConfigError, match="not_a_real_pkg_xyz"):
        CausalLM("pkg:not_a_real_pkg_xyz")


@pytest.fixture(scope="module")
def sentence_llm(tiny_llm_dir):
    return CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=6), prompt_layout="sentence")


def test_sentence_layout_reads_prompts_as_a_first_sentence(sentence_llm):
    """``[bos][prompts][eos][prefix][target][eos]``, the loss on the target and its eos only."""
    llm, tok = sentence_llm, sentence_llm.tokenizer
    assert tok("a photo of").input_ids[0] != tok.bos_token_id  # the fixture's tokenizer adds no BOS itself
    torch.manual_seed(4)
    prompts = torch.randn(2, 3, 64)
    prefixes, targets = ["a photo of", ""], ["a red circle", "two blue squares above a green triangle"]
    embed = llm.model.get_input_embeddings()
    total, count = 0.0, 0
    for i, (prefix, target) in enumerate(zip(prefixes, targets)):
        head = [tok.eos_token_id, *tok(prefix, add_special_tokens=False).input_ids]
        t = [*tok(f"{prefix} {target}".strip(), add_special_tokens=False).input_ids[len(head) - 1 :], tok.eos_token_id]
        embeds = torch.cat(
            [embed(torch.tensor([[tok.bos_token_id]])), prompts[i : i + 1], embed(torch.tensor([head + t]))], 1
        )
        logits = llm.model(inputs_embeds=embeds).logits[0]
        start = 1 + 3 + len(head)  # first target position
        total = total + torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(t), reduction="sum")
        count += len(t)
    assert torch.allclose(llm.loss(prompts, None, prefixes, targets), total / count, atol=1e-5)


def test_sentence_layout_batched_generation_equals_one_by_one(sentence_llm):
    torch.manual_seed(5)
    prompts = torch.randn(3, 4, 64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    prefixes = ["a photo of", "question what colour is the circle short answer", ""]
    batched = sentence_llm.generate(prompts, mask, prefixes)
    single = [sentence_llm.generate(prompts[i : i + 1, : int(mask[i].sum())], None, [prefixes[i]])[0] for i in range(3)]
    assert batched == single


def test_context_text_goes_before_the_prompts(tiny_llm_dir):
    """``[context][prompts][prefix][target][eos]``: the loss is the plain LM's on that sequence, and batched
    generation with padded prompts equals one by one."""
    llm = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=6), context="a picture")
    tok, embed = llm.tokenizer, llm.model.get_input_embeddings()
    torch.manual_seed(6)
    prompts = torch.randn(1, 3, 64)
    context = tok("a picture", add_special_tokens=False).input_ids
    prefix = tok("a photo of").input_ids
    target = [*tok(" a red circle", add_special_tokens=False).input_ids, tok.eos_token_id]
    embeds = torch.cat([embed(torch.tensor([context])), prompts, embed(torch.tensor([prefix + target]))], 1)
    logits = llm.model(inputs_embeds=embeds).logits[0]
    start = len(context) + 3 + len(prefix)
    manual = torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(target))
    assert torch.allclose(llm.loss(prompts, None, ["a photo of"], ["a red circle"]), manual, atol=1e-5)
    without = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=6))
    assert not torch.allclose(without.loss(prompts, None, ["a photo of"], ["a red circle"]), manual, atol=1e-3)
    prompts = torch.randn(2, 4, 64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batched = llm.generate(prompts, mask, ["a photo of", ""])
    assert batched == [
        llm.generate(prompts[i : i + 1, : int(mask[i].sum())], None, [p])[0] for i, p in enumerate(["a photo of", ""])
    ]


CHAT = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<s> the photo </s>{% endif %}"
    "<s> {{ m['role'] }} {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %} <s> answer{% endif %}"
)


@pytest.fixture(scope="module")
def chat_dir(tiny_llm_dir, tmp_path_factory):
    """The tiny LM with a chat template of its own (its default system turn: "the photo")."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_llm_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


def test_chat_template_puts_the_prompts_first_in_the_user_turn(chat_dir):
    """``[template head][prompts][prefix, end of turn, assistant opening][target][eos]``, as the template renders it;
    equal to the hand-written layout of the same text (context = head, prefix = tail)."""
    llm = CausalLM(str(chat_dir), decoding=Decoding(max_new_tokens=4), chat_template=True)
    assert llm.chat.head == "<s> the photo </s><s> user "
    assert llm.chat.tail(" what colour") == " what colour </s> <s> answer"
    empty = CausalLM(str(chat_dir), chat_template=True, system="")
    assert empty.chat.head == "<s> system  </s><s> user "  # an explicit (empty) system turn replaces the default
    by_hand = CausalLM(str(chat_dir), context=llm.chat.head)
    torch.manual_seed(7)
    prompts = torch.randn(2, 3, 64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tails = [llm.chat.tail(p) for p in (" what colour", " what shape")]
    torch.testing.assert_close(
        llm.loss(prompts, mask, [" what colour", " what shape"], ["red", "a circle"]),
        by_hand.loss(prompts, mask, tails, ["red", "a circle"]),
    )
    ids = llm._prefix_ids(" what colour")
    assert ids == llm.tokenizer(" what colour </s> <s> answer", add_special_tokens=False).input_ids
    assert len(llm.generate(prompts, mask, [" what colour", " what shape"])) == 2


def test_chat_template_errors_are_one_line(tiny_llm_dir, chat_dir):
    with pytest.raises(ConfigError, match=r"^llm\.chat_template: the tokenizer of .* has no chat template"):
        CausalLM(str(tiny_llm_dir), chat_template=True)
    with pytest.raises(ConfigError, match=r"^llm\.chat_template builds the turn itself"):
        CausalLM(str(chat_dir), chat_template=True, context="a picture")


def test_weighted_loss_is_the_weighted_mean_of_each_samples_own_loss(llm):
    torch.manual_seed(2)
    prompts = torch.randn(3, 3, 64)
    targets = ["red", "a small blue square to the left of a green triangle", "two"]
    singles = torch.stack([llm.loss(prompts[i : i + 1], None, ["q"], [targets[i]]) for i in range(3)])
    weights = torch.tensor([0.6, 0.3, 0.1])
    weighted = llm.loss(prompts, None, ["q"] * 3, targets, weights)
    assert torch.allclose(weighted, (weights * singles).sum() / weights.sum(), atol=1e-5)
    only_first = llm.loss(prompts, None, ["q"] * 3, targets, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(only_first, singles[0], atol=1e-5)


def test_a_given_decoding_replaces_the_models_own(llm):
    torch.manual_seed(3)
    prompts = torch.randn(2, 3, 64)
    own = llm.generate(prompts, None, ["a photo of"] * 2)
    short = llm.generate(prompts, None, ["a photo of"] * 2, Decoding(max_new_tokens=1))
    assert llm.decoding.max_new_tokens == 6  # untouched
    for full, one in zip(own, short, strict=True):
        assert len(llm.tokenizer(one, add_special_tokens=False).input_ids) <= 1
        assert full.startswith(one)  # greedy: the first token is the same


def test_the_constant_head_is_read_once_and_changes_no_loss_or_gradient(tiny_llm_dir, chat_dir):
    """The text before the prompts (a chat template's opening, a context) runs once into a key-value cache that
    every later step starts from: the loss and the prompts' gradient are those of the whole sequence run anew."""
    for llm in (CausalLM(str(chat_dir), chat_template=True), CausalLM(str(tiny_llm_dir), context="a picture")):
        torch.manual_seed(8)
        prompts = torch.randn(3, 4, 64, requires_grad=True)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
        args = (mask, [" what colour", "", " what shape"], ["red", "a small blue circle", "a circle"])
        assert llm._head_cacheable()
        cached = llm.loss(prompts, *args)
        (grad_cached,) = torch.autograd.grad(cached, prompts)
        assert llm._head_cache is not None and llm.loss(prompts, *args).item() == pytest.approx(cached.item())
        llm._head_cacheable = lambda: False  # the whole sequence, every time
        anew = llm.loss(prompts, *args)
        (grad_anew,) = torch.autograd.grad(anew, prompts)
        torch.testing.assert_close(cached, anew, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_cached, grad_anew, atol=1e-5, rtol=1e-4)


def test_no_head_cache_where_the_head_could_change_or_be_replayed(tiny_llm_dir):
    assert not CausalLM(str(tiny_llm_dir))._head_cacheable()  # no head at all
    assert not CausalLM(str(tiny_llm_dir), context="a picture", frozen=False)._head_cacheable()  # its weights train
    checkpointed = CausalLM(str(tiny_llm_dir), context="a picture")
    from torch.distributed._composable import checkpoint

    checkpoint(checkpointed.model.model.layers[0])  # as model.activation_checkpointing does
    assert not checkpointed._head_cacheable()
