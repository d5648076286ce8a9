"""Video encoding: FrameEncoder with each temporal module, EVLGen's contextualizer against a direct computation,
starting as the image model, training only its own weights, frame-order (in)sensitivity, and every bridge reading
video tokens inside a Captioner."""

from __future__ import annotations

import pytest
import torch

from vlgen.bridges import LinearProjector, QFormer, TokenMergingConnector
from vlgen.encoders import ConcatFrames, FrameEncoder, MeanOverTime, MiddleFrame, TemporalContextualizer, TimmEncoder
from vlgen.encoders.temporal import ContextualizedBlock, TemporalAttention
from vlgen.errors import ConfigError
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner

VIT = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}


def vit() -> TimmEncoder:
    return TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, init_seed=0)


def clips(b: int = 2, t: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(1))


def open_gates(encoder: FrameEncoder, value: float = 0.7) -> None:
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, TemporalAttention):
                m.gate.fill_(value)
                if m.frame_embed is not None:
                    m.frame_embed.normal_()


def test_temporal_attention_matches_a_direct_computation():
    torch.manual_seed(0)
    att = TemporalAttention(dim=8, hidden_dim=4, num_heads=2)
    with torch.no_grad():
        att.gate.fill_(0.5)
    b, t, n = 2, 3, 5
    x = torch.randn(b * t, n, 8)
    got = att(x, t)
    want = x.clone()
    for i in range(b):
        for pos in range(n):
            seq = x.reshape(b, t, n, 8)[i, :, pos]  # [T, C] one position's frames
            q, k = att.query(seq), att.key(seq)  # [T, 4]
            for head in range(2):
                qk = slice(2 * head, 2 * head + 2)
                qh, kh, vh = q[:, qk], k[:, qk], seq[:, 4 * head : 4 * head + 4]
                weights = torch.softmax(qh @ kh.T / 2.0, dim=-1)  # scale hidden_dim ** -0.5 = 1/2
                mixed = weights @ vh  # [T, 4]
                for f in range(t):
                    want[i * t + f, pos, 4 * head : 4 * head + 4] += 0.5 * mixed[f]
    torch.testing.assert_close(got, want)
    maps = x.transpose(1, 2).reshape(b * t, 8, 1, n)  # the same tokens as a channels-first map
    torch.testing.assert_close(att(maps, t).flatten(2).transpose(1, 2), got)


EVA = {"img_size": 28, "patch_size": 14, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("name", ["vit", "eva", "cnn"])
def test_contextualizer_starts_as_the_image_model_and_trains_only_itself(name):
    image = {
        "vit": vit,
        "eva": lambda: TimmEncoder("eva_giant_patch14_224", model_kwargs=EVA, init_seed=0),
        "cnn": lambda: TimmEncoder("test_resnet", init_seed=0, feature_stage=3),
    }[name]()
    x = clips(size={"vit": 32, "eva": 28, "cnn": 64}[name])
    with torch.no_grad():
        plain = image(x.flatten(0, 1)).unflatten(0, (2, 4)).mean(1)  # the image model, averaged over frames
    enc = FrameEncoder(image, TemporalContextualizer(hidden_dim=16, num_heads=8 if name == "cnn" else 2))
    wrapped = [m for m in enc.modules() if isinstance(m, ContextualizedBlock)]
    assert wrapped and all(m.mid == (name != "cnn") for m in wrapped)
    torch.testing.assert_close(enc(x), plain)
    enc(x).pow(2).mean().backward()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(".temporal." in n for n in trainable)
    assert all(p.grad is None for n, p in enc.named_parameters() if n not in trainable)
    gates = [m.temporal.gate for m in wrapped]
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gates)  # the gates move first
    open_gates(enc)
    assert not torch.allclose(enc(x), plain, atol=1e-4)


def test_the_papers_contextualizer_cannot_tell_frame_order_but_frame_embeddings_can():
    x = clips()
    reverse = x.flip(1)
    paper = FrameEncoder(vit(), TemporalContextualizer(hidden_dim=16, num_heads=2))
    open_gates(paper)
    torch.testing.assert_close(paper(x), paper(reverse))  # attention across frames + mean: order-blind
    ordered = FrameEncoder(vit(), TemporalContextualizer(hidden_dim=16, num_heads=2, frame_embedding=True))
    open_gates(ordered)
    assert not torch.allclose(ordered(x), ordered(reverse), atol=1e-4)
    concat = FrameEncoder(vit(), ConcatFrames(max_frames=4))
    realigned = concat(reverse).unflatten(1, (4, -1)).flip(1).flatten(1, 2)  # frames put back in their places
    assert not torch.allclose(concat(x), realigned, atol=1e-4)  # each frame's tokens carry its position


def test_pooling_modules_and_images_as_one_frame_clips():
    image = vit()
    x = clips()
    tokens = image(x.flatten(0, 1)).unflatten(0, (2, 4))  # [B, T, N, D]
    torch.testing.assert_close(FrameEncoder(image, MeanOverTime())(x), tokens.mean(1))
    seen = []
    image.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    torch.testing.assert_close(FrameEncoder(image, MiddleFrame())(x), tokens[:, 2])
    assert seen == [2]  # only the middle frame of each clip was encoded
    concat = FrameEncoder(image, ConcatFrames(max_frames=8))
    assert concat(x).shape == (2, 4 * tokens.shape[2], 32)
    with pytest.raises(ConfigError, match="max_frames"):
        FrameEncoder(image, ConcatFrames(max_frames=2))(x)
    assert FrameEncoder(image)(x[:, 0]).shape == tokens[:, 0].shape  # [B, C, H, W] works too


def test_bad_placements_are_named():
    with pytest.raises(ConfigError, match="after_attention"):
        FrameEncoder(TimmEncoder("test_resnet"), TemporalContextualizer(num_heads=8, position="after_attention"))
    with pytest.raises(ConfigError, match="num_heads"):
        FrameEncoder(vit(), TemporalContextualizer(num_heads=5))


@pytest.mark.parametrize("bridge", ["linear", "qformer", "connector"])
def test_every_bridge_trains_on_video_tokens(bridge, tiny_llm_dir, tiny_bert_dir):
    make = {
        "linear": lambda: LinearProjector(),
        "qformer": lambda: QFormer(str(tiny_bert_dir), num_queries=4),
        "connector": lambda: TokenMergingConnector(num_layers=2, r=1, hidden_size=32, num_heads=2),
    }[bridge]
    encoder = FrameEncoder(vit(), TemporalContextualizer(hidden_dim=16, num_heads=2))
    model = Captioner(encoder, make(), CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=3)))
    model.log = lambda *a, **k: None
    batch = {
        "pixels": clips(),
        "captions": ["a red circle", "a blue square"],
        "references": [["a red circle"], ["a blue square"]],
        "ids": ["0", "1"],
        "num_skipped": 0,
    }
    model.training_step(batch, 0).backward()
    gates = [m.gate for m in model.modules() if isinstance(m, TemporalAttention)]
    assert gates and all(g.grad is not None and g.grad.abs() > 0 for g in gates)
    assert all(p.grad is None for p in model.llm.parameters())
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    assert {k for k in ckpt["state_dict"] if ".temporal." in k} == {
        n for n, p in model.named_parameters() if ".temporal." in n
    }
    assert len(model.caption(clips())) == 2


def test_a_video_model_starts_from_an_image_models_checkpoint(tiny_llm_dir, tmp_path):
    llm = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=3))
    image_model = Captioner(vit(), LinearProjector(), llm)
    with torch.no_grad():
        image_model.bridge.proj[1].weight.normal_()
    ckpt = {"state_dict": image_model.state_dict()}
    image_model.on_save_checkpoint(ckpt)  # what a fit saves: trainable weights only
    torch.save(ckpt, tmp_path / "image.ckpt")
    video = FrameEncoder(vit(), TemporalContextualizer(hidden_dim=16, num_heads=2))
    model = Captioner(video, LinearProjector(), llm, init_from=str(tmp_path / "image.ckpt"))
    torch.testing.assert_close(model.bridge.proj[1].weight, image_model.bridge.proj[1].weight)
    assert all(m.gate.item() == 0 for m in model.modules() if isinstance(m, TemporalAttention))  # fresh
    torch.save({"state_dict": {"bridge.proj.1.weight": torch.zeros(3, 3)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match=r"model.init_from: bridge.proj.1.weight is \(3, 3\)"):
        Captioner(vit(), LinearProjector(), llm, init_from=str(tmp_path / "other.ckpt"))
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "unrelated.ckpt")
    with pytest.raises(ConfigError, match="holds none of this model's weights"):
        Captioner(vit(), LinearProjector(), llm, init_from=str(tmp_path / "unrelated.ckpt"))
