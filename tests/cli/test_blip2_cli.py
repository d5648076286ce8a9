"""BLIP-2 through the `vlgen` command: tiny stage 1, then stage 2 from its checkpoint, then test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

STAGE1 = REPO / "configs" / "tiny" / "blip2_stage1.yaml"
STAGE2 = REPO / "configs" / "tiny" / "blip2_stage2.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_bert_dir) -> Path:
    """Overrides for both stages: a small world, a tiny BERT for the Q-Former, quick tiny LM and encoder."""
    work = tmp_path_factory.mktemp("blip2")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    data = {"init_args": {"root": str(work / "shapes"), "generate": world, "batch_size": 8, "num_workers": 0}}
    encoder = {"init_args": tiny_encoder(work, world)}
    trainer = {"max_steps": 6, "limit_val_batches": 1, "log_every_n_steps": 2}
    stage1 = {
        "trainer": {**trainer, "val_check_interval": 3},
        "model": {"init_args": {"qformer": {"init_args": {"bert": str(tiny_bert_dir)}}, "encoder": encoder}},
    }
    llm = tiny_lm(work, world, steps=20)
    stage2 = {
        "trainer": trainer,
        "model": {
            "init_args": {
                "bridge": {"init_args": {"bert": str(tiny_bert_dir)}},
                "llm": {"init_args": llm},
                "encoder": encoder,
            }
        },
    }
    for name, override in (("stage1", stage1), ("stage2", stage2)):
        (work / f"{name}.yaml").write_text(yaml.safe_dump({**override, "data": data}))
    return work


@pytest.mark.slow
def test_stage1_then_stage2_then_test(workdir):
    vlgen("fit", "--config", str(STAGE1), "--config", str(workdir / "stage1.yaml"), cwd=workdir)
    stage1_ckpt = workdir / "runs" / "tiny-blip2-stage1" / "last.ckpt"  # where configs/tiny/blip2_stage2.yaml looks
    stage1 = torch.load(stage1_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert stage1["qformer.query_tokens"].shape[1] == 8 and "itm_head.weight" in stage1
    assert not any(k.startswith("encoder.") for k in stage1)  # the frozen encoder is rebuilt, not saved
    metrics = (run_dirs(workdir)[-1] / "metrics.csv").read_text()
    assert "train/itc" in metrics and "train/itm" in metrics and "train/itg" in metrics and "val/r1_i2t" in metrics

    stage2_args = ["--config", str(STAGE2), "--config", str(workdir / "stage2.yaml")]
    vlgen("fit", *stage2_args, cwd=workdir)
    stage2_ckpt = run_dirs(workdir)[-1] / "checkpoints" / "last.ckpt"
    state = torch.load(stage2_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "bridge.language_projection.weight" in state and not any(k.startswith("llm.") for k in state)
    # Stage 2 started from stage 1: parameters that stage 2's few steps barely move are still close to stage 1's,
    # and far from a fresh start (the Q-Former's cross-attention is random when not loaded).
    key = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    before, after = stage1[f"qformer.{key}"], state[f"bridge.{key}"]  # stage 1's module calls the bridge "qformer"
    assert (after - before).abs().max() < 0.05 * before.abs().max()

    vlgen("test", *stage2_args, "--ckpt_path", str(stage2_ckpt), cwd=workdir)
    scores = json.loads((run_dirs(workdir)[-1] / "metrics.json").read_text())
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(scores)


@pytest.mark.slow
def test_stage2_without_its_stage1_checkpoint_stops_with_one_line(tmp_path, workdir):
    proc = vlgen(
        "fit",
        "--config",
        str(STAGE2),
        "--config",
        str(workdir / "stage2.yaml"),
        "--model.bridge.init_args.init_from",
        str(tmp_path / "missing.ckpt"),
        cwd=workdir,
        check=False,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlgen: error: bridge.init_from") and "missing.ckpt" in last
