"""TimmEncoder: token shapes, freezing, transforms from the model config, local weights, bad names."""

from __future__ import annotations

import pytest
import torch

from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError

VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_tokens_shape_and_frozen_eval():
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    tokens = enc(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 32) and enc.embed_dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    assert not tokens.requires_grad


def test_trainable_when_not_frozen():
    enc = TimmEncoder("vit_tiny_patch16_224", frozen=False, model_kwargs=VIT)
    enc.train()
    enc(torch.randn(1, 3, 32, 32)).sum().backward()
    assert enc.model.training and enc.model.patch_embed.proj.weight.grad is not None


def test_transform_follows_model_size_and_overrides():
    from PIL import Image

    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, transform={"crop_pct": 1.0, "mean": (0, 0, 0)})
    x = enc.image_transform(train=False)(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.full((32, 32), 1.0 / 0.5))  # red channel: (1 - 0) / 0.5


def test_drop_last_blocks_and_local_checkpoint(tmp_path):
    src = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    loaded = TimmEncoder("vit_tiny_patch16_224", checkpoint_path=str(path), drop_last_blocks=1, model_kwargs=VIT)
    assert len(loaded.model.blocks) == 1
    assert torch.equal(loaded.model.patch_embed.proj.weight, src.model.patch_embed.proj.weight)


def test_bad_name_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no_such_vit"):
        TimmEncoder("no_such_vit")
    with pytest.raises(ConfigError, match="checkpoint_path"):
        TimmEncoder("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "x.pth"), model_kwargs=VIT)


def test_init_seed_gives_the_same_weights_whatever_the_global_rng():
    kwargs = {"model_kwargs": {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 24, "num_heads": 2}}
    torch.manual_seed(1)
    a = TimmEncoder("vit_tiny_patch16_224", init_seed=7, **kwargs)
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = TimmEncoder("vit_tiny_patch16_224", init_seed=7, **kwargs)
    c = TimmEncoder("vit_tiny_patch16_224", init_seed=8, **kwargs)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.state_dict()["model.pos_embed"], c.state_dict()["model.pos_embed"])
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_a)  # the global RNG stream is left as it was
