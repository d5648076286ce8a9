"""End to end through the `vlgen` command: configs/tiny/lora.yaml trains the bridge and LoRA adapters on the frozen
tiny LM, its checkpoint holds exactly those, and `vlgen test --ckpt_path` and `vlgen.load` read it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

import vlgen as vlgen_api
from vlgen.lora import adapter_parameters, has_lora

LORA = REPO / "configs" / "tiny" / "lora.yaml"


@pytest.mark.slow
def test_lora_config_fits_tests_and_loads(tmp_path):
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    override = {
        "trainer": {"max_steps": 6, "limit_val_batches": 1, "log_every_n_steps": 2},
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(tmp_path, world)},
                # A barely pre-trained LM and short captions: this checks the plumbing, not caption quality.
                "llm": {"init_args": {**tiny_lm(tmp_path, world, steps=20), "decoding": {"max_new_tokens": 8}}},
                "optim": {"warmup_steps": 2},
            }
        },
        "data": {"init_args": {"root": str(tmp_path / "shapes"), "generate": world, "batch_size": 8, "num_workers": 0}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    args = ["--config", str(LORA), "--config", str(tmp_path / "override.yaml")]
    vlgen("fit", *args, cwd=tmp_path)

    run = run_dirs(tmp_path)[-1]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    state = ckpt["state_dict"]
    llm_keys = [k for k in state if k.startswith("llm.")]
    assert llm_keys and all(".lora_A." in k or ".lora_B." in k for k in llm_keys)  # adapters only, no LM weight
    assert any(k.startswith("bridge.") for k in state) and not [k for k in state if k.startswith("encoder.")]
    assert any(state[k].abs().sum() > 0 for k in llm_keys if ".lora_B." in k)  # B starts at zero: it trained
    assert set(ckpt["vlgen"]["frozen_fingerprint"]) == {"encoder", "llm"}

    vlgen("test", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    scores = json.loads((run_dirs(tmp_path)[-1] / "metrics.json").read_text())
    assert "CIDEr" in scores

    model = vlgen_api.load(run)
    assert has_lora(model.llm.model)
    adapters = {f"llm.model.{n}": p for n, p in adapter_parameters(model.llm.model)}
    assert set(adapters) == set(llm_keys)
    assert all(torch.equal(p.detach(), state[k]) for k, p in adapters.items())
    merged = model.llm.export(Path(tmp_path) / "merged-lm")
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
