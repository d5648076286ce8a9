"""Blocks and activation checkpointing (:mod:`vlgen.sharding`), in one process: which blocks each exported component
declares (the FSDP2 units, checked end to end in tests/cli/test_fsdp_fit.py), that activation checkpointing leaves
the loss, every gradient and the random stream as they were, and that ``configure_model`` without a device mesh
shards nothing. Every component's blocks being called whole is a contract check (tests/test_contracts.py)."""

from __future__ import annotations

import pytest
import torch
from contract_examples import EXAMPLES, Fixtures, frame_image

from vlgen import sharding
from vlgen.bridges import PFormer, TokenMergingConnector
from vlgen.encoders import FrameEncoder, TemporalContextualizer, TimmEncoder
from vlgen.encoders.temporal import TemporalModule
from vlgen.errors import ConfigError
from vlgen.interfaces import Bridge
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner

# The blocks each exported component's contract example declares, by class name, in order.
EXPECTED_BLOCKS = {
    "TimmEncoder": ["BasicBlock", "BasicBlock", "Bottleneck", "BasicBlock"],  # test_resnet: one block a stage
    "HFBlip2Vision": ["Blip2EncoderLayer"] * 2,
    "FrameEncoder": ["Block"] * 2,  # over frame_image: test_vit, 2 blocks
    "LinearProjector": [],
    "MLPProjector": [],
    "QFormer": ["QFormerLayer"] * 2,
    "TokenMergingConnector": ["MergingLayer"] * 2,
    "CausalLM": ["LlamaDecoderLayer"] * 2,
    "Seq2SeqLM": ["T5Block"] * 4,  # 2 encoder + 2 decoder blocks
}


@pytest.mark.parametrize("cls", [c for c in EXAMPLES if not issubclass(c, TemporalModule)], ids=lambda c: c.__name__)
def test_each_exported_component_declares_its_blocks(cls, request):
    assert cls.__name__ in EXPECTED_BLOCKS, f"say which blocks {cls.__name__} declares in EXPECTED_BLOCKS"
    component = EXAMPLES[cls](Fixtures(request))
    if isinstance(component, Bridge):  # examples are unbuilt; the Q-Former's cross-attention comes with build
        component.build(16, 24)
    blocks = component.block_modules()
    assert [type(b).__name__ for b in blocks] == EXPECTED_BLOCKS[cls.__name__]
    inside = {id(m) for m in component.modules()}
    assert all(id(b) in inside for b in blocks), "a block that is not a submodule of its component"


def test_a_temporal_contextualizer_makes_its_wrappers_the_blocks(request):
    encoder = FrameEncoder(frame_image(Fixtures(request)), TemporalContextualizer(hidden_dim=16, num_heads=2))
    assert [type(b).__name__ for b in encoder.block_modules()] == ["ContextualizedBlock"] * 2


def test_feature_stage_leaves_out_the_blocks_never_run():
    full = TimmEncoder("test_resnet", init_seed=0).block_modules()
    early = TimmEncoder("test_resnet", init_seed=0, feature_stage=3).block_modules()  # stem + 3 stages
    assert len(full) == 4 and len(early) == 3


def test_the_pformer_declares_its_bert_blocks(tiny_bert_dir):
    names = [type(b).__name__ for b in PFormer(str(tiny_bert_dir), num_prompts=2).block_modules()]
    assert names == ["BertEmbeddings", "BertLayer", "BertLayer"]


# --- activation checkpointing ---------------------------------------------------------------------------------------
VIT = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}


def captioner(tiny_llm_dir, checkpointing: bool | list[str]) -> Captioner:
    """A captioner whose every part has blocks on the gradient's path: a trainable ViT, the connector (dropout on),
    the frozen tiny Llama reading the prompts."""
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, frozen=False)
    bridge = TokenMergingConnector(num_layers=2, r=1, hidden_size=32, num_heads=2, dropout=0.1)
    llm = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=3))
    model = Captioner(encoder, bridge, llm, activation_checkpointing=checkpointing)
    model.log = lambda *a, **k: None  # no trainer attached
    model.configure_model()
    return model.train()


def step(model: Captioner) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
    """One training step from a fixed seed: its loss, its gradients, a draw of the random stream after it, and the
    number of values the forward kept for the backward."""
    torch.manual_seed(1)
    captions = ["a red circle", "two small blue squares left of a big red circle"]  # padded: a real attention mask
    batch = {"pixels": torch.randn(2, 3, 32, 32), "captions": captions, "references": [[c] for c in captions],
             "ids": ["0", "1"], "num_skipped": 0}  # fmt: skip
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, torch.rand(4), kept[0]


def test_activation_checkpointing_leaves_loss_gradients_and_random_stream_unchanged(tiny_llm_dir):
    plain = step(captioner(tiny_llm_dir, False))
    model = captioner(tiny_llm_dir, True)
    assert {k for k, v in sharding.component_blocks(model).items() if v} == {"encoder", "bridge", "llm"}
    checked = step(model)
    assert torch.equal(checked[0], plain[0])
    assert checked[1].keys() == plain[1].keys() and len(plain[1]) > 10
    worst = max(float((checked[1][k] - plain[1][k]).abs().max()) for k in plain[1])
    print(f"activation checkpointing: loss {float(plain[0]):.6f} both ways, max gradient difference {worst:.1e}")
    assert worst == 0.0  # the same ops, replayed with the same dropout masks
    assert torch.equal(checked[2], plain[2])  # the random stream goes on where it would have
    print(f"values kept for the backward: {plain[3]:,} plain, {checked[3]:,} checkpointed")
    assert checked[3] < plain[3] / 2  # the blocks' activations are recomputed, not kept


def test_activation_checkpointing_by_component_and_unknown_names(tiny_llm_dir):
    model = captioner(tiny_llm_dir, ["llm"])
    assert step(model)[1]  # trains
    with pytest.raises(ConfigError, match="activation_checkpointing: projector has no blocks"):
        captioner(tiny_llm_dir, ["projector"])


def test_configure_model_without_a_mesh_shards_nothing_and_runs_once(tiny_llm_dir):
    model = captioner(tiny_llm_dir, True)
    model.configure_model()  # again, as Lightning does for each entry point: nothing more is applied
    assert not sharding.is_sharded(model)
    assert step(model)[1]
