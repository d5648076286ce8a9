"""Contract tests: the same checks over every component class vlgen exports, as timm's tests/test_models.py runs
the same checks over every model in its registry.

The classes come from the ``__all__`` of :data:`COMPONENT_MODULES`; a class is a component when it is a concrete
(``not inspect.isabstract``) subclass of one of the ABCs in :data:`KINDS`; anything else exported there (``Decoding``,
``ClipLength``, the P-Former, which maps text to prompts and is no ``Bridge``) is not. A new component gets these
checks by being exported; the only per-class knowledge is one tiny constructor example per class in
tests/contract_examples.py, and a test fails naming every exported component that lacks one.

Temporal modules are checked through :class:`~vlgen.encoders.FrameEncoder` (``FrameEncoder(frame_image, module)``),
which makes each of them a video encoder that also gets every encoder check.
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from contract_examples import EXAMPLES, Fixtures, frame_image
from PIL import Image
from torch import Tensor, nn

from vlgen.encoders import FrameEncoder
from vlgen.encoders.temporal import TemporalModule
from vlgen.interfaces import Bridge, BridgeOutput, LanguageModel, VisualEncoder

# --- which classes are components -----------------------------------------------------------------------------------
COMPONENT_MODULES = ("vlgen.encoders", "vlgen.encoders.temporal", "vlgen.bridges", "vlgen.llms")
KINDS: dict[str, type] = {
    "encoder": VisualEncoder,
    "temporal": TemporalModule,
    "bridge": Bridge,
    "llm": LanguageModel,
}

# OBJECTIVES ---------------------------------------------------------------------------------------------------------
# Hook for vlgen.objectives (another component kind, being added now; deliberately not imported here). When it lands:
#   1. add "vlgen.objectives" to COMPONENT_MODULES and its ABC to KINDS as "objective";
#   2. give each exported objective class one tiny example in contract_examples.EXAMPLES;
#   3. add an "objectives" section of parametrised checks next to the ones below, over COMPONENTS["objective"]
#      (test_every_exported_component_has_an_example then covers the new classes by itself).
# ---------------------------------------------------------------------------------------------------------------------


def exported_components() -> dict[str, list[type]]:
    """Every concrete component class exported from :data:`COMPONENT_MODULES`, by kind, each once."""
    found: dict[str, list[type]] = {kind: [] for kind in KINDS}
    seen: set[type] = set()
    for module_name in COMPONENT_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.isclass(obj) or inspect.isabstract(obj) or obj in seen:
                continue
            kind = next((k for k, base in KINDS.items() if issubclass(obj, base)), None)
            if kind is not None:
                found[kind].append(obj)
                seen.add(obj)
    return found


COMPONENTS = exported_components()


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def example(cls: type, fx: Fixtures) -> nn.Module:
    """The example instance of ``cls``; a clear failure when the table has none."""
    if cls not in EXAMPLES:
        pytest.fail(
            f"{qualname(cls)} is an exported component without a constructor example: "
            f"add a tiny factory for it to EXAMPLES in tests/contract_examples.py"
        )
    module = EXAMPLES[cls](fx)
    assert type(module) is cls, f"EXAMPLES[{cls.__name__}] built a {type(module).__name__}, not a {cls.__name__}"
    return module


def test_every_kind_has_exported_components():
    empty = [kind for kind, classes in COMPONENTS.items() if not classes]
    assert not empty, f"no concrete component found for {empty} in the __all__ of {COMPONENT_MODULES}"


def test_every_exported_component_has_an_example():
    missing = [f"{qualname(c)} ({kind})" for kind, classes in COMPONENTS.items() for c in classes if c not in EXAMPLES]
    assert not missing, (
        "exported components without a constructor example in tests/contract_examples.py (add one tiny factory "
        "to EXAMPLES for each): " + ", ".join(missing)
    )


def test_every_example_is_an_exported_component():
    exported = {c for classes in COMPONENTS.values() for c in classes}
    stale = [qualname(c) for c in EXAMPLES if c not in exported]
    assert not stale, f"EXAMPLES has entries for classes that are not exported components: {stale}"


# --- shared checks ----------------------------------------------------------------------------------------------------
def assert_finite(x: Tensor, what: str) -> None:
    assert torch.isfinite(x).all(), f"{what} has non-finite values"


FROZEN_AS_BUILT: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def as_built(module: nn.Module) -> nn.Module:
    """Remember which parameters ``module`` has frozen now, as built (a later ``requires_grad_`` cannot hide one)."""
    FROZEN_AS_BUILT[module] = {n for n, p in module.named_parameters() if not p.requires_grad}
    return module


def assert_grads_only_where_trainable(module: nn.Module, what: str) -> None:
    """After a backward: every trainable parameter has a gradient (not all zero), no frozen one has any (frozen as
    built, see :func:`as_built`, or now)."""
    params = dict(module.named_parameters())
    frozen = FROZEN_AS_BUILT.get(module, set()) | {n for n, p in params.items() if not p.requires_grad}
    leaked = [n for n in params if n in frozen and params[n].grad is not None]
    missing = [n for n, p in params.items() if n not in frozen and p.grad is None]
    assert not leaked, f"{what}: frozen parameters got gradients: {leaked[:8]}"
    assert not missing, f"{what}: trainable parameters got no gradient: {missing[:8]}"
    trainable = [p for n, p in params.items() if n not in frozen]
    if trainable:
        assert any(p.grad.abs().sum() > 0 for p in trainable), f"{what}: every gradient is zero"
        assert all(torch.isfinite(p.grad).all() for p in trainable), f"{what}: non-finite gradients"


def skip_unless_trainable(module: nn.Module) -> None:
    if not any(p.requires_grad for p in module.parameters()):
        pytest.skip(f"{type(module).__name__} example has no trainable parameter: nothing to backpropagate into")


def assert_frozen_parts_stay_in_eval(component: nn.Module) -> None:
    """After ``.train()``, inside every module that says ``frozen = True``: modules with parameters, none trainable,
    are in eval mode, and so are parameter-free ones (dropout, identity) whose parent has no trainable parameter."""
    component.train()
    try:
        claims = [(name, m) for name, m in component.named_modules() if getattr(m, "frozen", None) is True]
        if not claims:
            pytest.skip(f"{type(component).__name__} example says no part of it is frozen")
        training = []
        for prefix, claim in claims:
            subs = dict(claim.named_modules())
            for name, sub in subs.items():
                params = list(sub.parameters())
                parent = subs[name.rpartition(".")[0]] if name else sub
                if params:
                    frozen = not any(p.requires_grad for p in params)
                else:  # dropout, identity...: frozen when its parent is
                    frozen = not any(p.requires_grad for p in parent.parameters())
                if frozen and sub.training:
                    training.append(".".join(filter(None, [prefix, name])) or "<root>")
        assert not training, f"frozen modules left in train mode by .train(): {training[:8]}"
    finally:
        component.eval()


def perturb_(module: nn.Module, seed: int = 123) -> None:
    """Move every floating parameter and buffer away from its initial value (so a twin must load them to match)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def assert_round_trip(a: nn.Module, b: nn.Module, run) -> None:
    """``b`` (a fresh twin) gives ``a``'s outputs exactly once it loads ``a.state_dict()``, and not before."""
    a.eval()
    b.eval()
    with torch.no_grad():
        want = run(a)
        assert not torch.equal(run(b), want), "the fresh twin already matches: the round trip would prove nothing"
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(run(b), want, rtol=0, atol=0)


# === ENCODERS (and temporal modules, through FrameEncoder) ==========================================================
BATCH, FRAMES = 2, 3


@dataclass(frozen=True)
class EncoderCase:
    """An exported encoder's example, or an exported temporal module's example hosted by ``FrameEncoder``."""

    cls: type
    hosted: bool = False

    def build(self, fx: Fixtures) -> VisualEncoder:
        module = example(self.cls, fx)
        return FrameEncoder(frame_image(fx), module) if self.hosted else module

    def __str__(self) -> str:
        return f"FrameEncoder[{self.cls.__name__}]" if self.hosted else self.cls.__name__


ENCODER_CASES = [EncoderCase(c) for c in COMPONENTS["encoder"]] + [EncoderCase(c, True) for c in COMPONENTS["temporal"]]


def pil_images(n: int, seed: int = 0) -> Iterator[Image.Image]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield Image.fromarray(rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8))


def is_video(encoder: VisualEncoder) -> bool:
    """A video encoder folds time with a temporal module: it reads ``[B, T, C, H, W]``."""
    return any(isinstance(m, TemporalModule) for m in encoder.modules())


def encoder_input(encoder: VisualEncoder) -> Tensor:
    """A batch of 2 built with the encoder's own ``image_transform(False)``: images, or clips of 3 frames."""
    transform = encoder.image_transform(False)
    frames = FRAMES if is_video(encoder) else 1
    x = torch.stack([transform(im) for im in pil_images(BATCH * frames)])  # [B*T, C, H, W]
    assert x.ndim == 4 and x.shape[1] == 3, f"image_transform(False) gave {tuple(x.shape[1:])}, not [C, H, W]"
    return x.unflatten(0, (BATCH, frames)) if is_video(encoder) else x


@pytest.fixture(scope="module", params=ENCODER_CASES, ids=str)
def encoder_case(request) -> EncoderCase:
    return request.param


@pytest.fixture(scope="module")
def encoder(encoder_case: EncoderCase, request) -> VisualEncoder:
    torch.manual_seed(0)
    return as_built(encoder_case.build(Fixtures(request))).eval()


def test_encoder_tokens_are_batch_by_tokens_by_embed_dim(encoder):
    encoder.eval()
    x = encoder_input(encoder)
    with torch.no_grad():
        tokens = encoder(x)
    assert tokens.ndim == 3, f"{tuple(x.shape)} -> {tuple(tokens.shape)}, not [B, N, D]"
    assert tokens.shape[0] == BATCH and tokens.shape[1] >= 1 and tokens.shape[2] == encoder.embed_dim, (
        f"{tuple(x.shape)} -> {tuple(tokens.shape)}, expected [{BATCH}, N, embed_dim={encoder.embed_dim}]"
    )
    assert_finite(tokens, "tokens")
    assert not torch.allclose(tokens[0], tokens[1]), "two different inputs gave the same tokens"


def test_encoder_gradients_reach_only_trainable_parameters(encoder):
    skip_unless_trainable(encoder)
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    try:
        encoder(encoder_input(encoder)).float().pow(2).mean().backward()
        assert_grads_only_where_trainable(encoder, type(encoder).__name__)
    finally:
        encoder.zero_grad(set_to_none=True)
        encoder.eval()


def test_encoder_frozen_parts_stay_in_eval_after_train(encoder):
    assert_frozen_parts_stay_in_eval(encoder)


def test_encoder_state_dict_round_trip(encoder_case, request):
    fx = Fixtures(request)
    torch.manual_seed(0)
    a = encoder_case.build(fx)
    perturb_(a)
    torch.manual_seed(1)
    b = encoder_case.build(fx)
    x = encoder_input(a)
    assert_round_trip(a, b, lambda m: m(x))


@pytest.mark.parametrize("temporal_cls", COMPONENTS["temporal"], ids=lambda c: c.__name__)
def test_temporal_module_keeps_the_image_encoder_frozen_and_trains_its_own_parameters(temporal_cls, request):
    fx = Fixtures(request)
    image = frame_image(fx)
    assert image.frozen and not any(p.requires_grad for p in image.parameters()), "frame_image must be frozen"
    own = {id(p) for p in image.parameters()}
    encoder = as_built(FrameEncoder(image, example(temporal_cls, fx))).train()
    unfrozen = [n for n, p in encoder.named_parameters() if id(p) in own and p.requires_grad]
    assert not unfrozen, f"attaching {temporal_cls.__name__} unfroze the image encoder's weights: {unfrozen[:8]}"
    tokens = encoder(encoder_input(encoder))  # [B, T, C, H, W] -> [B, M, D]
    assert tokens.ndim == 3 and tokens.shape[0] == BATCH and tokens.shape[2] == image.embed_dim, tuple(tokens.shape)
    added = {n for n, p in encoder.named_parameters() if id(p) not in own}
    if not any(p.requires_grad for p in encoder.parameters()):
        assert not tokens.requires_grad, "nothing trains, yet the tokens carry a graph"
        return
    tokens.pow(2).mean().backward()
    assert_grads_only_where_trainable(encoder, f"FrameEncoder[{temporal_cls.__name__}]")
    trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trained <= added, f"trainable parameters the temporal module did not add: {sorted(trained - added)[:8]}"


# === BRIDGES ========================================================================================================
VISION_DIM, LLM_DIM, NUM_TOKENS = 16, 24, 9

# Public ways a bridge reports how many prompts it makes for ``n`` visual tokens (any it has must be right).
PROMPT_COUNTS = {
    "prompt_count": lambda bridge, n: bridge.prompt_count(n),
    "output_tokens": lambda bridge, n: bridge.output_tokens(n),
    "num_queries": lambda bridge, n: bridge.num_queries,
    "num_prompts": lambda bridge, n: bridge.num_prompts,
}


def built(cls: type, fx: Fixtures) -> Bridge:
    bridge = example(cls, fx)
    bridge.build(VISION_DIM, LLM_DIM)
    return bridge


def visual_tokens(n: int = NUM_TOKENS, batch: int = BATCH, seed: int = 0) -> Tensor:
    return torch.randn(batch, n, VISION_DIM, generator=torch.Generator().manual_seed(seed))


def padding_mask(n: int = NUM_TOKENS, padded: int = 3) -> Tensor:
    """``[2, n]``: row 0 all real, row 1 with its last ``padded`` tokens padding."""
    mask = torch.ones(BATCH, n, dtype=torch.long)
    mask[1, n - padded :] = 0
    return mask


@pytest.fixture(scope="module", params=COMPONENTS["bridge"], ids=lambda c: c.__name__)
def bridge_cls(request) -> type:
    return request.param


@pytest.fixture(scope="module")
def bridge(bridge_cls, request) -> Bridge:
    torch.manual_seed(0)
    return as_built(built(bridge_cls, Fixtures(request))).eval()


def check_output(bridge: Bridge, out: BridgeOutput, batch: int) -> int:
    """Shapes and finiteness of a bridge's output; returns the prompt count ``M``."""
    assert isinstance(out, BridgeOutput), f"forward returned {type(out).__name__}, not BridgeOutput"
    prompts = out.prompts
    assert prompts.ndim == 3 and prompts.shape[0] == batch and prompts.shape[2] == LLM_DIM, (
        f"prompts {tuple(prompts.shape)}, expected [{batch}, M, llm_dim={LLM_DIM}]"
    )
    assert_finite(prompts, "prompts")
    if out.mask is not None:
        assert tuple(out.mask.shape) == tuple(prompts.shape[:2]), f"mask {tuple(out.mask.shape)}, prompts [B, M] ="
    for name, loss in out.losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), f"loss {name!r} is not a finite scalar"
    if out.pooled is not None:
        assert out.pooled.ndim == 2 and out.pooled.shape[0] == batch, f"pooled {tuple(out.pooled.shape)}, not [B, H]"
        assert_finite(out.pooled, "pooled")
    if hasattr(bridge, "pooled_dim"):  # the width it declares for BridgeOutput.pooled (None: it gives none)
        width = None if out.pooled is None else out.pooled.shape[1]
        assert width == bridge.pooled_dim, f"pooled_dim says {bridge.pooled_dim}, the output's pooled is {width} wide"
    return prompts.shape[1]


def test_bridge_prompts_are_batch_by_prompts_by_llm_dim(bridge):
    bridge.eval()
    with torch.no_grad():
        check_output(bridge, bridge(visual_tokens()), BATCH)


def test_bridge_masked_tokens_do_not_change_the_real_prompts(bridge):
    bridge.eval()
    tokens, mask = visual_tokens(), padding_mask()
    garbage = tokens.clone()
    garbage[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), VISION_DIM)
    with torch.no_grad():
        out, changed = bridge(tokens, mask), bridge(garbage, mask)
    check_output(bridge, out, BATCH)
    check_output(bridge, changed, BATCH)
    if out.mask is None:  # every prompt is real
        torch.testing.assert_close(changed.prompts, out.prompts, msg="padded tokens' values changed the prompts")
    else:
        assert torch.equal(changed.mask, out.mask), "padded tokens' values changed the prompt mask"
        real = out.mask.bool()
        assert real.any(1).all(), "a sample with real tokens got no real prompt"
        torch.testing.assert_close(
            changed.prompts[real], out.prompts[real], msg="padded tokens' values changed the real prompts"
        )


def test_bridge_gradients_reach_trainable_parameters_and_tokens_only(bridge):
    bridge.train()
    bridge.zero_grad(set_to_none=True)
    tokens = visual_tokens().requires_grad_(True)
    try:
        out = bridge(tokens, padding_mask())
        loss = out.prompts.pow(2).mean() + sum(out.losses.values(), torch.zeros(()))
        loss.backward()
        assert_grads_only_where_trainable(bridge, type(bridge).__name__)
        assert tokens.grad is not None and tokens.grad[0].abs().sum() > 0, "no gradient reaches the visual tokens"
    finally:
        bridge.zero_grad(set_to_none=True)
        bridge.eval()


def test_bridge_frozen_parts_stay_in_eval_after_train(bridge):
    assert_frozen_parts_stay_in_eval(bridge)


def test_bridge_state_dict_round_trip(bridge_cls, request):
    fx = Fixtures(request)
    torch.manual_seed(0)
    a = built(bridge_cls, fx)
    perturb_(a)
    torch.manual_seed(1)
    b = built(bridge_cls, fx)
    tokens, mask = visual_tokens(), padding_mask()
    assert_round_trip(a, b, lambda m: m(tokens, mask).prompts)


@pytest.mark.parametrize("num_tokens", [NUM_TOKENS, 17])
def test_bridge_prompt_count_is_what_it_reports(bridge, num_tokens):
    reports = {name: count for name, count in PROMPT_COUNTS.items() if hasattr(bridge, name)}
    if not reports:
        pytest.skip(f"{type(bridge).__name__} reports no prompt count ({', '.join(PROMPT_COUNTS)})")
    bridge.eval()
    with torch.no_grad():
        m = check_output(bridge, bridge(visual_tokens(num_tokens, batch=1)), 1)
    wrong = {name: int(count(bridge, num_tokens)) for name, count in reports.items()}
    wrong = {name: value for name, value in wrong.items() if value != m}
    assert not wrong, f"{num_tokens} tokens gave {m} prompts, but the bridge reports {wrong}"


# === LANGUAGE MODELS ================================================================================================
PREFIXES, TARGETS = ["", "a photo of"], ["a red circle", "two blue squares"]


@pytest.fixture(scope="module", params=COMPONENTS["llm"], ids=lambda c: c.__name__)
def llm(request) -> LanguageModel:
    torch.manual_seed(0)
    return as_built(example(request.param, Fixtures(request))).eval()


def input_embedding_widths(lm: LanguageModel) -> dict[str, int]:
    """The width of the LM's input embeddings, as each way it exposes them says: ``embed_text`` and the
    ``get_input_embeddings()`` table of the (outermost) model inside."""
    widths = {}
    if callable(getattr(lm, "embed_text", None)):
        with torch.no_grad():
            embeds, mask = lm.embed_text(["a red circle", "a"])
        assert embeds.ndim == 3 and embeds.shape[:2] == mask.shape, f"embed_text: {embeds.shape}, mask {mask.shape}"
        widths["embed_text"] = embeds.shape[-1]
    for module in lm.modules():
        get = getattr(module, "get_input_embeddings", None)
        if callable(get) and isinstance(emb := get(), nn.Module) and getattr(emb, "weight", None) is not None:
            widths["get_input_embeddings"] = emb.weight.shape[1]
            break
    if not widths:
        pytest.fail(f"{type(lm).__name__}: neither embed_text nor get_input_embeddings to compare hidden_size with")
    return widths


def prompts_for(lm: LanguageModel, batch: int, num: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, num, lm.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_llm_hidden_size_is_the_input_embedding_width(llm):
    widths = input_embedding_widths(llm)
    assert all(w == llm.hidden_size for w in widths.values()), f"hidden_size {llm.hidden_size}, embeddings {widths}"
    width = llm.hidden_size
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError)):
        llm.loss(torch.randn(1, 2, width + 8), None, [""], ["a red circle"])  # prompts of another width


def test_llm_loss_is_finite_and_its_gradient_reaches_the_prompts_not_frozen_weights(llm):
    llm.train()
    llm.zero_grad(set_to_none=True)
    prompts = prompts_for(llm, BATCH, 3).requires_grad_(True)
    try:
        loss = llm.loss(prompts, None, PREFIXES, TARGETS)
        assert loss.ndim == 0 and torch.isfinite(loss), f"loss {loss} is not a finite scalar"
        loss.backward()
        assert prompts.grad is not None and (prompts.grad.abs().sum((1, 2)) > 0).all(), "no gradient to the prompts"
        assert_finite(prompts.grad, "prompt gradients")
        assert_grads_only_where_trainable(llm, type(llm).__name__)
    finally:
        llm.zero_grad(set_to_none=True)
        llm.eval()


@pytest.mark.parametrize("masked", [False, True])
def test_llm_generate_returns_one_string_per_sample(llm, masked):
    llm.eval()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]) if masked else None
    texts = llm.generate(prompts_for(llm, BATCH, 3), mask, PREFIXES)
    assert isinstance(texts, list) and len(texts) == BATCH, f"generate returned {texts!r} for {BATCH} samples"
    assert all(isinstance(t, str) for t in texts), f"generate returned {texts!r}"


@pytest.mark.parametrize("prefix", PREFIXES, ids=["no-prefix", "prefix"])
def test_llm_padded_prompts_values_are_ignored(llm, prefix):
    """Prompts under mask 0 are padding: their values reach neither the loss nor the generated text."""
    llm.eval()
    real = prompts_for(llm, 1, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    a = torch.cat([real, torch.zeros(1, 2, llm.hidden_size)], 1)
    b = torch.cat([real, 10 * prompts_for(llm, 1, 2, seed=5)], 1)
    with torch.no_grad():
        loss_a, loss_b = (llm.loss(p, mask, [prefix], TARGETS[:1]) for p in (a, b))
    torch.testing.assert_close(loss_b, loss_a, msg=lambda m: f"padded prompt values changed the loss: {m}")
    assert llm.generate(b, mask, [prefix]) == llm.generate(a, mask, [prefix]), "padded prompt values changed the text"


def test_llm_padded_prompt_row_has_the_loss_of_the_unpadded_batch_of_one(llm):
    """A row whose prompts are padded at the end (as a batch with longer neighbours pads it; the connector's mask
    puts padding slots last) reads ``[prompts][target]``: its loss is that of the row alone, unpadded."""
    llm.eval()
    real = prompts_for(llm, 1, 3)
    padded = torch.cat([real, prompts_for(llm, 1, 2, seed=5)], 1)
    with torch.no_grad():
        alone = llm.loss(real, None, [""], TARGETS[:1])
        in_batch = llm.loss(padded, torch.tensor([[1, 1, 1, 0, 0]]), [""], TARGETS[:1])
    torch.testing.assert_close(in_batch, alone, msg=lambda m: f"prompt padding changed the row's loss: {m}")


def test_llm_frozen_parts_stay_in_eval_after_train(llm):
    assert_frozen_parts_stay_in_eval(llm)


# === BLOCKS (the FSDP2 units and activation-checkpointing units, vlgen.sharding) ====================================
def assert_blocks_called_whole(component: nn.Module, run, what: str) -> None:
    """``component.block_modules()`` are distinct submodules, none inside another, and ``run()`` calls each of them
    (its forward hooks fire: FSDP2 gathers a block's weights in them, so a block run otherwise would fail)."""
    blocks = component.block_modules()
    names = {id(m): n for n, m in component.named_modules()}
    assert all(id(b) in names for b in blocks), f"{what}: a block is not a submodule of the component"
    assert len({id(b) for b in blocks}) == len(blocks), f"{what}: a block is declared twice"
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    nested = [names[id(b)] for b in blocks if id(b) in inner]
    assert not nested, f"{what}: blocks inside other blocks: {nested}"
    calls = [0] * len(blocks)
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    skipped = [names[id(b)] for b, n in zip(blocks, calls) if n == 0]
    assert not skipped, f"{what}: blocks never called whole (their forward hooks did not fire): {skipped[:8]}"


def test_encoder_blocks_are_called_whole(encoder):
    encoder.eval()
    x = encoder_input(encoder)
    assert_blocks_called_whole(encoder, lambda: encoder(x), type(encoder).__name__)


def test_bridge_blocks_are_called_whole(bridge):
    bridge.eval()
    assert_blocks_called_whole(bridge, lambda: bridge(visual_tokens(), padding_mask()), type(bridge).__name__)


@pytest.mark.parametrize("entry", ["loss", "generate"])
def test_llm_blocks_are_called_whole(llm, entry):
    llm.eval()
    prompts = prompts_for(llm, BATCH, 3)
    runs = {
        "loss": lambda: llm.loss(prompts, None, PREFIXES, TARGETS),
        "generate": lambda: llm.generate(prompts, None, PREFIXES),
    }
    assert_blocks_called_whole(llm, runs[entry], f"{type(llm).__name__}.{entry}")
