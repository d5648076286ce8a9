"""LoRA adapters (vlgen.lora) on the frozen LLM and on the timm encoder: what trains, what a training step changes,
lean checkpoints that round-trip, the merged export, the config path and the one-line errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_artifacts import TRANSFORM, VIT  # tests/ is on the path (no package)
from test_artifacts import model_config as tiny_captioner

import vlgen
from vlgen import artifacts
from vlgen.errors import ConfigError
from vlgen.lora import LoRA, adapter_parameters, has_lora, lora_layers, merged_state_dict

REPO = Path(__file__).resolve().parents[1]
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def model_config(llm_dir: Path, encoder_lora: dict | None = None) -> dict:
    """test_artifacts' tiny Captioner with rank-4 adapters on every linear layer of its Llama (and on the ViT when
    ``encoder_lora``)."""
    return tiny_captioner(llm_dir, encoder_lora=encoder_lora, llm_lora={"r": 4, "alpha": 8})


def perturb_trainable(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move every trainable weight off its initialisation (LoRA's B starts at zero: the adapters would do nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture
def model(tiny_llm_dir):
    """The tiny Captioner with LoRA on its LLM, built through the config path (as the CLI builds it)."""
    torch.manual_seed(0)
    m = artifacts.build_model(model_config(tiny_llm_dir))
    perturb_trainable(m)
    return m.eval()


def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(m) -> torch.Tensor:
    """The LLM's logits over the prompts the model gives for :func:`pixels` followed by a short text."""
    out = m(pixels())
    text, _ = m.llm.embed_text(["a red circle"] * len(out.prompts))
    return m.llm.model(inputs_embeds=torch.cat([out.prompts, text], 1)).logits


def batch() -> dict:
    captions = ["a red circle", "a blue square left", "two small triangles"]
    return {"pixels": pixels(), "captions": captions, "references": [[c] for c in captions], "ids": ["0", "1", "2"],
            "num_skipped": 0}  # fmt: skip


def adapted_layer_sizes(module: torch.nn.Module, r: int) -> int:
    """What rank-``r`` adapters on every adapted layer of ``module`` hold: ``r * (in + out)`` each."""
    return sum(r * (layer.in_features + layer.out_features) for layer in lora_layers(module).values())


def vlgen_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlgen")]


# --- what trains ----------------------------------------------------------------------------------------------------
def test_trainable_parameters_are_exactly_the_adapters_and_the_bridge(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"llm.model.{n}" for n, _ in adapter_parameters(model.llm.model)}
    bridge = {f"bridge.{n}" for n, _ in model.bridge.named_parameters()}
    assert adapters and trainable == adapters | bridge
    layers = lora_layers(model.llm.model)
    assert {n.rpartition(".")[2] for n in layers} == LLAMA_LINEAR  # all-linear: the head and embeddings are not
    assert len(layers) == 2 * len(LLAMA_LINEAR)
    count = sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    assert count == adapted_layer_sizes(model.llm.model, 4)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    base = [p for n, p in model.llm.named_parameters() if f"llm.{n}" not in adapters]
    assert base and not any(p.requires_grad for p in base)
    # The adapted LM keeps what the rest of vlgen reads off a Hugging Face model.
    assert type(model.llm.model).__name__ == "LlamaForCausalLM" and model.llm.hidden_size == 64
    assert model.llm._keep_arg is not None and model.llm.model.config.model_type == "llama"


def test_the_frozen_base_stays_in_eval_mode_and_only_the_adapters_follow_train(model):
    model.train()
    llm = model.llm.model
    dropouts = [m for n, m in llm.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts)  # LoRA dropout acts in training
    base = [m for n, m in llm.named_modules() if "lora_" not in n]
    assert not any(m.training for m in base)  # the LM's own dropout stays off, as a frozen LM's does
    model.eval()
    assert not any(m.training for m in llm.modules())


def test_a_training_step_changes_only_the_adapters_and_the_bridge(model):
    from vlgen.models.base import Optim

    model.optim = Optim(lr=1e-2, warmup_steps=0, max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss = sum(model.training_losses(batch()).values())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable  # every adapter and bridge weight moved; nothing else did
    kept = {k for k in model.state_dict() if k in model._trainable_keys()}
    assert kept == trainable  # and exactly those are what a checkpoint keeps


# --- checkpoints and export -----------------------------------------------------------------------------------------
def test_a_checkpoint_round_trip_gives_identical_logits_and_captions(model, tiny_llm_dir, tmp_path, caplog):
    config = model_config(tiny_llm_dir)
    artifacts.attach_config(model, config)
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    kept = set(ckpt["state_dict"])
    assert {k for k in kept if k.startswith("llm.")} == {
        f"llm.model.{n}" for n, _ in adapter_parameters(model.llm.model)
    }
    assert all("lora_" in k for k in kept if k.startswith("llm."))  # no frozen LM weight in the checkpoint
    assert not [k for k in kept if k.startswith("encoder.")]
    assert set(ckpt["vlgen"]["frozen_fingerprint"]) == {"encoder", "llm"}
    ckpt["pytorch-lightning_version"] = lightning.__version__  # what a Trainer adds beside the state dict
    path = tmp_path / "lora.ckpt"
    torch.save(ckpt, path)

    caplog.set_level(logging.INFO)
    loaded = vlgen.load(path)
    assert not vlgen_warnings(caplog)  # the rebuilt frozen LM is the one the adapters were trained against
    assert has_lora(loaded.llm.model)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.caption(pixels()) == model.caption(pixels())
    fresh = artifacts.build_model(config)  # the same config without the saved adapters and bridge differs
    assert not torch.equal(logits(fresh), logits(model))

    # Lightning's own loader (what `vlgen test --ckpt_path` restores through), with the parts built anew.
    from vlgen.models import Captioner

    parts = artifacts.build_model(config)
    again = Captioner.load_from_checkpoint(path, encoder=parts.encoder, bridge=parts.bridge, llm=parts.llm)
    assert torch.equal(logits(again.eval()), logits(model))
    assert not vlgen_warnings(caplog)

    # save_pretrained keeps the same lean weights; vlgen.load rebuilds the adapted model from them.
    out = model.save_pretrained(str(tmp_path / "saved"))
    assert set(load_file(str(out / "model.safetensors"))) == kept
    assert torch.equal(logits(vlgen.load(out)), logits(model))


def test_other_frozen_llm_weights_under_the_adapters_give_the_one_warning(model, tiny_llm_dir, tmp_path, caplog):
    artifacts.attach_config(model, model_config(tiny_llm_dir))
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    with torch.no_grad():  # a frozen base weight under an adapter, changed in place
        next(iter(lora_layers(model.llm.model).values())).base_layer.weight.mul_(2.0)
    caplog.set_level(logging.INFO)
    model.on_load_checkpoint(ckpt)
    lines = vlgen_warnings(caplog)
    assert len(lines) == 1 and "llm" in lines[0] and "encoder" not in lines[0]


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_the_merged_export_has_no_peft_layers_and_the_adapted_logits(kind, tiny_llm_dir, tiny_t5_dir, tmp_path):
    from vlgen.llms import CausalLM, Decoding, Seq2SeqLM

    cls, directory = (CausalLM, tiny_llm_dir) if kind == "causal" else (Seq2SeqLM, tiny_t5_dir)
    lm = cls(str(directory), decoding=Decoding(max_new_tokens=4), lora=LoRA(r=4, target_modules="all-linear"))
    perturb_trainable(lm, scale=0.05)  # adapters of about a trained run's size
    lm.eval()
    prompts = torch.randn(2, 3, lm.hidden_size, generator=torch.Generator().manual_seed(0))

    def run(m) -> torch.Tensor:
        with torch.no_grad():
            text, mask = m.embed_text(["a red circle", "a blue square left"])
            embeds = torch.cat([prompts.to(text.dtype), text], 1)
            mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
            extra = {"decoder_input_ids": torch.tensor([[0, 5, 6], [0, 7, 8]])} if kind == "seq2seq" else {}
            return m.model(inputs_embeds=embeds, attention_mask=mask, **extra).logits

    # (W + B A) x and W x + B A x round differently in float32; the random tiny T5 (logits up to ~15, unscaled
    # attention) amplifies that to ~1e-5 relative, so it is held to 1e-5 relative and absolute, the Llama to 1e-5
    # absolute. In float64 (below) both agree to 1e-9: the merge itself is exact.
    tolerance = {"rtol": 0.0, "atol": 1e-5} if kind == "causal" else {"rtol": 1e-5, "atol": 1e-5}
    adapted = run(lm)
    out = lm.export(tmp_path / "merged")
    names = set(load_file(str(out / "model.safetensors")))
    assert not [n for n in names if "lora_" in n or "base_layer" in n]
    plain = cls(str(out), decoding=Decoding(max_new_tokens=4))  # an ordinary LM: no lora option, no peft layers
    assert not has_lora(plain.model)
    torch.testing.assert_close(run(plain), adapted, **tolerance)
    assert plain.generate(prompts, None, ["a photo of", ""]) == lm.generate(prompts, None, ["a photo of", ""])
    assert has_lora(lm.model) and torch.equal(run(lm), adapted)  # export left the adapted LM as it was

    lm.model.double()
    plain.model.double().load_state_dict(merged_state_dict(lm.model))
    adapted64 = run(lm)
    torch.testing.assert_close(run(plain), adapted64, rtol=0.0, atol=1e-9)

    lm.merge_lora()  # in place: the same outputs, plain layers, nothing left to train
    assert not has_lora(lm.model) and lm.lora is None
    assert not any(p.requires_grad for p in lm.parameters())
    assert set(lm.model.state_dict()) == set(plain.model.state_dict())
    torch.testing.assert_close(run(lm), adapted64, rtol=0.0, atol=1e-9)


# --- the encoder ----------------------------------------------------------------------------------------------------
def test_lora_on_a_timm_vit_trains_only_its_adapters():
    from vlgen.encoders import TimmEncoder

    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, init_seed=0, transform=TRANSFORM, lora=LoRA(r=2))
    layers = lora_layers(encoder.model)
    assert {n.rpartition(".")[2] for n in layers} == {"qkv", "proj", "fc1", "fc2"}
    assert not [n for n in layers if n.startswith("patch_embed")]  # all-linear: not the patch-embedding conv
    trainable = {n for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_parameters(encoder.model)}
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == adapted_layer_sizes(encoder.model, 2)
    perturb_trainable(encoder)
    encoder.train()
    assert not encoder.model.blocks[0].norm1.training  # the frozen backbone stays in eval mode
    assert encoder.model.blocks[0].attn.qkv.lora_dropout["default"].training
    encoder(pixels()).pow(2).mean().backward()
    grads = {n for n, p in encoder.model.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_a_captioner_with_adapters_on_both_sides_saves_both(tiny_llm_dir):
    config = model_config(tiny_llm_dir, encoder_lora={"r": 2, "target_modules": ["qkv", "mlp.fc1"]})
    m = artifacts.build_model(config)
    assert {n.rpartition(".")[2] for n in lora_layers(m.encoder.model)} == {"qkv", "fc1"}
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    encoder_keys = [k for k in ckpt["state_dict"] if k.startswith("encoder.")]
    assert encoder_keys and all("lora_" in k for k in encoder_keys)


# --- config and errors ----------------------------------------------------------------------------------------------
def test_lora_parses_from_the_command_line_and_the_tiny_config(capsys):
    from vlgen.cli import main

    base = REPO / "configs" / "tiny" / "linear.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(base), "--model.llm.init_args.lora", "{r: 4}", "--print_config"])
    lora = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["llm"]["init_args"]["lora"]
    assert lora == {"r": 4, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear", "bias": "none"}
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "tiny" / "lora.yaml"), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert resolved["llm"]["init_args"]["lora"]["r"] == 4 and resolved["llm"]["init_args"]["frozen"] is True


def test_the_lora_lm_part_is_the_tiny_lm_with_adapters():
    """parts/lm_lora.yaml must load what parts/lm.yaml loads (the same folder, built the same way)."""
    parts = REPO / "configs" / "tiny" / "parts"
    plain, adapted = (yaml.safe_load((parts / name).read_text()) for name in ("lm.yaml", "lm_lora.yaml"))
    lora = adapted["init_args"].pop("lora")
    assert adapted == plain and lora["r"] >= 1


def test_config_mistakes_stop_with_one_line(tiny_llm_dir, monkeypatch):
    from vlgen.encoders import TimmEncoder
    from vlgen.llms import CausalLM

    cases = [
        (lambda: CausalLM(str(tiny_llm_dir), frozen=False, lora=LoRA()), "llm.frozen: true"),
        (lambda: CausalLM(str(tiny_llm_dir), lora=LoRA(target_modules=["qproj"])), "q_proj"),
        (lambda: CausalLM(str(tiny_llm_dir), lora=LoRA(r=0)), "llm.lora.r"),
        (lambda: TimmEncoder("test_resnet", init_seed=0, lora=LoRA()), "encoder.lora.target_modules"),
        (lambda: TimmEncoder("test_resnet", frozen=False, lora=LoRA()), "encoder.frozen: true"),
    ]
    for build, needle in cases:
        with pytest.raises(ConfigError) as err:
            build()
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r"llm\.lora: .*pip install peft") as err:
        CausalLM(str(tiny_llm_dir), lora=LoRA())
    assert "\n" not in str(err.value)
