"""EVLGen through the `vlgen` command: the tiny one-stage config fits (with the merge ramp) and tests."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

CONFIG = REPO / "configs" / "tiny" / "evlgen.yaml"


@pytest.mark.slow
def test_tiny_evlgen_fits_with_the_ramp_and_tests(tmp_path, tiny_bert_dir):
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    llm = tiny_lm(tmp_path, world, steps=20)
    override = {
        "trainer": {
            "max_steps": 8,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "vlgen.callbacks.MergeRamp", "init_args": {"steps": 4}},
            ],
        },
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(tmp_path, world)},
                "bridge": {"init_args": {"bert": str(tiny_bert_dir)}},
                "llm": {"init_args": llm},
            }
        },
        "data": {"init_args": {"root": str(tmp_path / "shapes"), "generate": world, "batch_size": 8, "num_workers": 0}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    args = ["--config", str(CONFIG), "--config", str(tmp_path / "override.yaml")]
    proc = vlgen("fit", *args, cwd=tmp_path)
    assert "16 visual tokens -> 8 prompts" in proc.stderr  # 4x4 map, r = 4 in each of 2 layers
    run = run_dirs(tmp_path)[-1]
    ramp = [
        float(r["train/merge_fraction"])
        for r in csv.DictReader(open(run / "metrics.csv"))
        if r.get("train/merge_fraction")
    ]
    assert ramp[0] == 0.0 and ramp[-1] == 1.0 and ramp == sorted(ramp)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "bridge.input_proj.weight" in state and "bridge.layers.1.output.dense.weight" in state
    assert not any(k.startswith(("llm.", "encoder.")) for k in state)

    vlgen("test", *args, "--ckpt_path", str(ckpt), cwd=tmp_path)
    scores = json.loads((run_dirs(tmp_path)[-1] / "metrics.json").read_text())
    assert {"CIDEr", "Bleu_4"} <= set(scores)
