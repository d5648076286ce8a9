"""P-Former alignment as an objective: the loss by hand, a frozen teacher outside the checkpoint, the prompt-count
check (at build and at every step), and the Captioner (projector, Q-Former and connector bridges, video tokens) and
BLIP-2 stage 1 training with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from vlgen.bridges import LinearProjector, PFormer, QFormer
from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Blip2Stage1, Captioner, PFormerStage0
from vlgen.objectives import ModelParts, PromptAlignment

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}  # 4 patches + [CLS]: 5 tokens
CAPTIONS = ["a red circle", "a blue square above a circle"]


@pytest.fixture(scope="module")
def llm(tiny_llm_dir) -> CausalLM:
    return CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=4))


def stage0_checkpoint(path: Path, bert_dir: Path, llm: CausalLM, num_prompts: int) -> str:
    """A stage-0 run's lean checkpoint, written the way Lightning saves it."""
    torch.manual_seed(0)
    stage0 = PFormerStage0(PFormer(str(bert_dir), num_prompts=num_prompts), llm)
    ckpt = {"state_dict": stage0.state_dict()}
    stage0.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt5(tmp_path_factory, tiny_bert_dir, llm) -> str:
    return stage0_checkpoint(tmp_path_factory.mktemp("s0") / "p5.ckpt", tiny_bert_dir, llm, 5)


@pytest.fixture(scope="module")
def ckpt4(tmp_path_factory, tiny_bert_dir, llm) -> str:
    return stage0_checkpoint(tmp_path_factory.mktemp("s0") / "p4.ckpt", tiny_bert_dir, llm, 4)


def alignment(bert_dir: Path, ckpt: str, num_prompts: int, weight: float = 100.0) -> PromptAlignment:
    return PromptAlignment(PFormer(str(bert_dir), num_prompts=num_prompts, init_from=ckpt), weight=weight)


def capture(model) -> dict[str, Tensor]:
    logged: dict[str, Tensor] = {}
    model.log = lambda name, value, **k: logged.__setitem__(name, value)
    return logged


def batch_of(pixels: Tensor) -> dict:
    return {"pixels": pixels, "captions": CAPTIONS, "references": [], "ids": [], "num_skipped": 0}


def test_loss_is_the_mse_and_the_teacher_is_frozen(tiny_bert_dir, ckpt5, llm):
    align = alignment(tiny_bert_dir, ckpt5, 5, weight=3.0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    bridge = LinearProjector()
    bridge.build(encoder.embed_dim, llm.hidden_size)
    parts = ModelParts(encoder, bridge, llm)
    align.build(parts)  # 5 tokens, 5 prompts
    assert align.pformer.llm_dim == 64 and align.weight == 3.0
    align.train()
    assert not any(p.requires_grad for p in align.parameters()) and not align.pformer.bert.training
    prompts = torch.randn(2, 5, 64, requires_grad=True)
    teacher = align.pformer(CAPTIONS).detach()
    loss = align.loss(BridgeOutput(prompts), batch_of(torch.zeros(2)), parts)  # unweighted: the model weighs it
    torch.testing.assert_close(loss, ((prompts.detach() - teacher) ** 2).mean())
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    by_hand = ((prompts.detach() - teacher) ** 2)[mask.bool()].mean()
    torch.testing.assert_close(align.loss(BridgeOutput(prompts, mask), batch_of(torch.zeros(2)), parts), by_hand)
    loss.backward()
    assert prompts.grad is not None and all(p.grad is None for p in align.parameters())


def test_prompt_count_mismatch_is_one_line_naming_both(tiny_bert_dir, ckpt4, llm):
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)  # 5 tokens
    bridge = LinearProjector()
    bridge.build(encoder.embed_dim, llm.hidden_size)
    with pytest.raises(
        ConfigError, match=r"^model.objectives: align: the bridge gives 5 prompts but the P-Former gives 4"
    ):
        alignment(tiny_bert_dir, ckpt4, 4).build(ModelParts(encoder, bridge, llm))


def test_captioner_with_a_projector_trains_with_alignment(tiny_bert_dir, ckpt5, llm):
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    model = Captioner(encoder, LinearProjector(), llm, objectives=[alignment(tiny_bert_dir, ckpt5, 5)])
    logged = capture(model)
    loss = model.training_step(batch_of(torch.randn(2, 3, 32, 32)), 0)
    assert logged["train/align"] > 0  # logged unweighted; the total weighs it by 100
    torch.testing.assert_close(loss, logged["train/lm_loss"] + 100.0 * logged["train/align"])
    loss.backward()
    assert all(p.grad is not None for p in model.bridge.parameters())
    assert all(p.grad is None for p in model.objectives.parameters())
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert not any(k.startswith("objectives.") for k in ckpt["state_dict"])  # rebuilt from init_from, not saved
    model.on_load_checkpoint(ckpt)


def test_captioner_refuses_a_projector_with_another_prompt_count(tiny_bert_dir, ckpt4, llm):
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    with pytest.raises(ConfigError, match="bridge gives 5 prompts but the P-Former gives 4"):
        Captioner(encoder, LinearProjector(), llm, objectives=[alignment(tiny_bert_dir, ckpt4, 4)])


def test_captioner_with_a_qformer_trains_with_alignment(tiny_bert_dir, ckpt4, llm):
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    bridge = QFormer(str(tiny_bert_dir), num_queries=4)
    model = Captioner(encoder, bridge, llm, objectives=[alignment(tiny_bert_dir, ckpt4, 4)])
    logged = capture(model)
    model.training_step(batch_of(torch.randn(2, 3, 32, 32)), 0).backward()
    assert "train/align" in logged and bridge.query_tokens.grad is not None


def test_blip2_stage1_aligns_through_a_projection_that_stage2_can_reuse(tiny_bert_dir, ckpt4, tmp_path):
    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    qformer = QFormer(str(tiny_bert_dir), num_queries=4, text_input=True)
    align = alignment(tiny_bert_dir, ckpt4, 4, weight=10.0)
    model = Blip2Stage1(encoder, qformer, embed_dim=8, max_text_len=12, objectives=[align])
    assert qformer.language_projection is not None and qformer.language_projection.out_features == 64  # stage 0's
    logged = capture(model)
    batch = {"pixels": torch.randn(2, 3, 32, 32), "captions": CAPTIONS, "references": [], "ids": ["0", "1"]}
    loss = model.training_step({**batch, "num_skipped": 0}, 0)
    assert logged["train/align"] > 0
    others = sum(logged[f"train/{k}"] for k in ("itc", "itm", "itg")) + 10.0 * logged["train/align"]
    torch.testing.assert_close(loss, others)
    loss.backward()
    assert qformer.language_projection.weight.grad is not None
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert "qformer.language_projection.weight" in ckpt["state_dict"]
    assert not any(k.startswith("objectives.") for k in ckpt["state_dict"])
    path = tmp_path / "stage1.ckpt"
    torch.save(ckpt, path)
    stage2 = QFormer(str(tiny_bert_dir), num_queries=4, init_from=str(path))
    stage2.build(encoder.embed_dim, 64)  # the same LLM width: stage 1's aligned projection carries over
    torch.testing.assert_close(stage2.language_projection.weight, qformer.language_projection.weight)
    other = QFormer(str(tiny_bert_dir), num_queries=4, init_from=str(path))
    other.build(encoder.embed_dim, 48)  # another LLM width: a fresh projection
    assert other.language_projection.weight.shape == (48, qformer.hidden_size)


def test_connector_aligns_once_its_merge_ramp_reaches_the_teachers_count(tiny_bert_dir, ckpt4, llm):
    from vlgen.bridges import TokenMergingConnector

    torch.manual_seed(0)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)  # 5 tokens; one merge leaves 4
    bridge = TokenMergingConnector(num_layers=1, r=1, hidden_size=32, num_heads=2)
    model = Captioner(encoder, bridge, llm, objectives=[alignment(tiny_bert_dir, ckpt4, 4)])
    batch = batch_of(torch.randn(2, 3, 32, 32))
    bridge.merge_fraction = 0.0  # the ramp's start: 5 prompts, no alignment yet, no error
    logged = capture(model)
    model.training_step(batch, 0).backward()
    assert "train/align" not in logged and "train/lm_loss" in logged
    bridge.merge_fraction = 1.0
    logged = capture(model)
    model.training_step(batch, 0)
    assert logged["train/align"] > 0


def test_alignment_works_on_video_tokens(tiny_bert_dir, ckpt5, llm):
    from vlgen.encoders import FrameEncoder, TemporalContextualizer
    from vlgen.encoders.temporal import TemporalAttention

    torch.manual_seed(0)
    encoder = FrameEncoder(
        TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT), TemporalContextualizer(hidden_dim=16, num_heads=2)
    )  # 5 tokens per clip, as per image: the P-Former's 5 prompts still match
    model = Captioner(encoder, LinearProjector(), llm, objectives=[alignment(tiny_bert_dir, ckpt5, 5)])
    logged = capture(model)
    model.training_step(batch_of(torch.randn(2, 4, 3, 32, 32)), 0).backward()  # clips [B, T, C, H, W]
    assert logged["train/align"] > 0
    assert all(m.gate.grad is not None for m in model.modules() if isinstance(m, TemporalAttention))


def test_concatenated_frames_stop_with_one_line_instead_of_never_aligning(tiny_bert_dir, ckpt5, llm):
    """ConcatFrames gives T x N tokens: checked on one image the count matched, so the step must say it does not."""
    from vlgen.encoders import ConcatFrames, FrameEncoder

    encoder = FrameEncoder(TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT), ConcatFrames(max_frames=4))
    model = Captioner(encoder, LinearProjector(), llm, objectives=[alignment(tiny_bert_dir, ckpt5, 5)])
    capture(model)
    with pytest.raises(
        ConfigError, match=r"^model.objectives: align: the bridge gave 20 prompts .* but 5 .*ConcatFrames"
    ):
        model.training_step(batch_of(torch.randn(2, 4, 3, 32, 32)), 0)
