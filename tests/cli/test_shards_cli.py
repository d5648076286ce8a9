"""End-to-end runs on WebDataset shards: fit / test through the CLI, and exact resume after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

TINY = REPO / "configs" / "tiny" / "linear.yaml"
SHARDS = REPO / "configs" / "tiny" / "shards_image.yaml"
STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def shard_work(tmp_path_factory) -> Path:
    """The tiny config on shards of a small world (150 images x 5 captions in shards of 64), checkpoints every
    ``EVERY`` steps; the encoder and LM built once into the directory."""
    work = tmp_path_factory.mktemp("shards-cli")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    generate = {
        "class_path": "vlgen.data.shards.write.WorldShards",
        "init_args": {"world": world, "root": str(work / "shapes"), "out": str(work / "shards"),
                      "samples_per_shard": 64},
    }  # fmt: skip
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "save_top_k": -1, "every_n_train_steps": EVERY, "filename": "{step}"},
    }
    override = {
        "trainer": {"max_steps": STEPS, "limit_val_batches": 1, "log_every_n_steps": 4, "callbacks": [checkpoint],
                    "num_sanity_val_steps": 0},
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(work, world)},
                "llm": {"init_args": tiny_lm(work, world, steps=100)},
                "optim": {"warmup_steps": 5},
            }
        },
        "data": {
            "init_args": {
                "train_shards": str(work / "shards" / "train" / "{00000..00011}.tar"),
                "val_shards": str(work / "shards" / "val" / "00000.tar"),
                "test_shards": str(work / "shards" / "test" / "00000.tar"),
                "generate": generate, "batch_size": 8, "num_workers": 2, "shuffle_block": 100,
                "index_dir": str(work / "index"),
            }
        },
    }  # fmt: skip
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    vlgen("fit", *args(work), "--trainer.max_steps", "1", cwd=work)  # builds world, shards, encoder, LM
    return work


def args(work: Path) -> list[str]:
    return ["--config", str(TINY), "--config", str(SHARDS), "--config", str(work / "override.yaml")]


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_weights(shard_work):
    vlgen("fit", *args(shard_work), cwd=shard_work)
    straight = run_dirs(shard_work)[-1] / "checkpoints"

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vlgen.cli", "fit", *args(shard_work), "--trainer.max_steps", str(STEPS * 4)]
    proc = subprocess.Popen(cmd, cwd=shard_work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            ckpts = list(run_dirs(shard_work)[-1].glob("checkpoints/step=12.ckpt")) if run_dirs(shard_work) else []
            if ckpts:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # past the next step or two, mid-epoch
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished (it was asked for 4x the steps)
    killed = run_dirs(shard_work)[-1] / "checkpoints"
    resume_from = killed / "step=12.ckpt"
    assert torch.load(resume_from, map_location="cpu", weights_only=True)["global_step"] == 12

    vlgen("fit", *args(shard_work), "--ckpt_path", str(resume_from), cwd=shard_work)
    resumed = run_dirs(shard_work)[-1] / "checkpoints"
    a, b = trainable(straight / f"step={STEPS}.ckpt"), trainable(resumed / f"step={STEPS}.ckpt")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    # the resume did not replay: weights differ from a run whose second half redrew the first half's batches
    assert any(not torch.equal(a[k], trainable(straight / "step=12.ckpt")[k]) for k in a)


@pytest.mark.slow
def test_test_and_predict_on_shards_see_every_test_sample_once(shard_work):
    ckpt = sorted(run_dirs(shard_work)[0].glob("checkpoints/*.ckpt"))[-1]
    vlgen("test", *args(shard_work), "--ckpt_path", str(ckpt), cwd=shard_work)
    run = run_dirs(shard_work)[-1]
    ids = [json.loads(line)["id"] for line in open(run / "predictions.jsonl")]
    assert len(ids) == len(set(ids)) == WORLD["num_test"]
    assert set(json.loads((run / "metrics.json").read_text())) >= {"CIDEr", "Bleu_4"}
    vlgen("predict", *args(shard_work), "--ckpt_path", str(ckpt), cwd=shard_work)  # no predict_dir: the test shards
    lines = [json.loads(line) for line in open(run_dirs(shard_work)[-1] / "predictions.jsonl")]
    assert sorted(x["id"] for x in lines) == sorted(ids) and all(isinstance(x["caption"], str) for x in lines)
