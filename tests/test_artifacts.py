"""Self-describing artifacts: save_pretrained / vlgen.load, checkpoints that carry their model config, and the
warning when the frozen parts are not the ones the trainable weights were trained against."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import vlgen
from vlgen import artifacts
from vlgen.errors import ConfigError

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
TRANSFORM = {"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def model_config(llm_dir: Path, encoder_lora: dict | None = None, llm_lora: dict | None = None) -> dict:
    """A tiny Captioner: a frozen random ViT (seeded, so every build has the same weights), an MLP bridge, and the
    frozen tiny Llama of ``llm_dir``; with ``encoder_lora`` / ``llm_lora``, adapters on the ViT / the Llama."""
    encoder = {"name": "vit_tiny_patch16_224", "model_kwargs": VIT, "init_seed": 0, "transform": TRANSFORM}
    llm = {"name_or_path": str(llm_dir), "decoding": {"max_new_tokens": 4}}
    if encoder_lora is not None:
        encoder["lora"] = encoder_lora
    if llm_lora is not None:
        llm["lora"] = llm_lora
    return {
        "class_path": "vlgen.models.Captioner",
        "init_args": {
            "encoder": {"class_path": "vlgen.encoders.TimmEncoder", "init_args": encoder},
            "bridge": {"class_path": "vlgen.bridges.MLPProjector"},
            "llm": {"class_path": "vlgen.llms.CausalLM", "init_args": llm},
        },
    }


@pytest.fixture
def llm_dir(tiny_llm_dir, tmp_path) -> Path:
    """A copy of the tiny Llama that a test may change."""
    return Path(shutil.copytree(tiny_llm_dir, tmp_path / "llm"))


@pytest.fixture
def model(llm_dir):
    """The tiny Captioner built in Python (not by the CLI), its bridge away from its initialisation."""
    from vlgen.bridges import MLPProjector
    from vlgen.encoders import TimmEncoder
    from vlgen.llms import CausalLM, Decoding
    from vlgen.models import Captioner

    torch.manual_seed(1)
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, init_seed=0, transform=TRANSFORM)
    m = Captioner(encoder, MLPProjector(), CausalLM(str(llm_dir), decoding=Decoding(max_new_tokens=4)))
    with torch.no_grad():
        for p in m.bridge.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def same_outputs(a, b) -> None:
    x = pixels()
    with torch.no_grad():
        assert torch.equal(a(x).prompts, b(x).prompts)
        assert a.caption(x) == b.caption(x)


def vlgen_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlgen")]


def test_import_vlgen_stays_light():
    code = "import sys, vlgen; assert callable(vlgen.load); print('lightning' in sys.modules, 'torch' in sys.modules)"
    before = "import sys, vlgen; print('lightning' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", before], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == "True"  # vlgen.load itself brought torch in, on first use


def test_save_pretrained_then_load_gives_the_same_captions(model, llm_dir, tmp_path, caplog):
    out = model.save_pretrained(str(tmp_path / "saved"), config=model_config(llm_dir))
    assert out == tmp_path / "saved"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "vlgen.models.Captioner"
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == {k for k in model.state_dict() if k in model._trainable_keys()}
    assert weights and all(k.startswith("bridge.") for k in weights)  # lean: no LLM, no encoder

    caplog.set_level(logging.INFO)
    loaded = vlgen.load(out)
    assert not loaded.training and loaded is not model
    assert not vlgen_warnings(caplog)  # the same frozen weights: no warning
    same_outputs(model, loaded)
    fresh = artifacts.build_model(model_config(llm_dir))  # the same config without the saved weights differs
    with torch.no_grad():
        assert not torch.equal(fresh(pixels()).prompts, model(pixels()).prompts)

    # The loaded model knows its config: saving it again needs none, and the model.safetensors path loads too.
    again = loaded.save_pretrained(str(tmp_path / "again"))
    same_outputs(model, vlgen.load(again / "model.safetensors"))


def test_save_pretrained_without_a_config_stops_with_one_line(model, tmp_path):
    with pytest.raises(ConfigError, match="no model config is known") as err:
        model.save_pretrained(str(tmp_path / "x"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()
    other = model_config(Path("/nowhere")) | {"class_path": "vlgen.models.PFormerStage0"}
    with pytest.raises(ConfigError, match="PFormerStage0"):
        model.save_pretrained(str(tmp_path / "x"), config=other)


def test_changed_frozen_llm_weights_give_one_warning_naming_the_llm(model, llm_dir, tmp_path, caplog):
    out = model.save_pretrained(str(tmp_path / "saved"), config={"model": model_config(llm_dir)})
    weights_file = llm_dir / "model.safetensors"
    llm_weights = load_file(str(weights_file))
    name = next(k for k in llm_weights if k.endswith("mlp.down_proj.weight"))
    llm_weights[name] = llm_weights[name] + 0.5
    save_file(llm_weights, str(weights_file), metadata={"format": "pt"})

    caplog.set_level(logging.INFO)
    vlgen.load(out)
    lines = vlgen_warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "llm" in lines[0] and "encoder" not in lines[0] and "trained against" in lines[0]


def test_checkpoint_carries_config_and_fingerprint_and_load_checks_it(model, llm_dir, caplog):
    artifacts.attach_config(model, model_config(llm_dir))
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    info = ckpt["vlgen"]
    assert info["model_config"] == model_config(llm_dir)
    assert set(info["frozen_fingerprint"]) == {"encoder", "llm"}  # the bridge trains: not fingerprinted

    caplog.set_level(logging.INFO)
    model.on_load_checkpoint(ckpt)  # what `vlgen fit/test --ckpt_path` calls
    assert not vlgen_warnings(caplog)
    with torch.no_grad():
        next(model.encoder.parameters()).mul_(2.0)  # a frozen weight changed in place: the cache does not hide it
    model.on_load_checkpoint(ckpt)
    lines = vlgen_warnings(caplog)
    assert len(lines) == 1 and "encoder" in lines[0] and "llm" not in lines[0]


def test_fingerprint_reads_a_fixed_sample_of_each_frozen_tensor():
    net = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(4, 4)).requires_grad_(False)
    first = artifacts.frozen_fingerprint(net)
    assert set(first) == {"0", "1"}
    with torch.no_grad():
        net[0].weight[1, 5] += 1.0  # off the strided sample (stride 2048*2048 // 256): unseen, by design
        net[1].weight[0, 0] += 1.0  # a small tensor is sampled whole
    second = artifacts.frozen_fingerprint(net)
    assert second["0"] == first["0"] and second["1"] != first["1"]
    assert artifacts.frozen_fingerprint(net.to(torch.bfloat16))["0"] != first["0"]  # another dtype: other weights


def test_a_checkpoint_without_a_config_uses_the_config_beside_it(model, llm_dir, tmp_path):
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)  # built in Python: the checkpoint carries no model config
    assert "model_config" not in ckpt["vlgen"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="carries no model config"):
        vlgen.load(run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {}, "model": model_config(llm_dir)}))
    same_outputs(model, vlgen.load(run))
    same_outputs(model, vlgen.load(run / "checkpoints" / "last.ckpt"))


def test_a_checkpoint_lacking_trainable_weights_stops_with_one_line(model, llm_dir, tmp_path):
    artifacts.attach_config(model, model_config(llm_dir))
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(".bias")}
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(ConfigError, match=r"lacks \d+ trainable weights") as err:
        vlgen.load(tmp_path / "broken.ckpt")
    assert "broken.ckpt" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["missing", "empty dir", "text file", "test run dir"])
def test_a_path_that_is_no_artifact_stops_with_one_line_naming_it(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "empty dir":
        path.mkdir()
    elif kind == "text file":
        path.write_text("not a checkpoint\n")
    elif kind == "test run dir":  # config.yaml but no checkpoint
        path.mkdir()
        (path / "config.yaml").write_text("model: {class_path: vlgen.models.Captioner}\n")
    with pytest.raises(ConfigError) as err:
        vlgen.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_fit_checkpoint_loads_alone_and_from_its_run_dir(llm_dir, tmp_path):
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": {"num_train": 16, "num_val": 4}}
    world["init_args"] |= {"num_test": 4, "num_text": 10, "image_size": 32}
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "callbacks": [callback],
        },
        "model": model_config(llm_dir),
        "data": {
            "class_path": "vlgen.data.ImageTextDataModule",
            "init_args": {"root": str(tmp_path / "shapes"), "generate": world, "batch_size": 4, "num_workers": 0},
        },
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "vlgen.cli", "fit", "--config", "fit.yaml"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "vlgen" / "version_0"
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["vlgen"]["model_config"]["init_args"]["llm"]["init_args"]["name_or_path"] == str(llm_dir)

    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(ckpt_path, alone)  # no config.yaml beside or above it
    from_ckpt = vlgen.load(alone)
    for key, value in ckpt["state_dict"].items():  # the trained weights, not a fresh initialisation
        assert torch.equal(from_ckpt.state_dict()[key], value)
    same_outputs(from_ckpt, vlgen.load(run))
