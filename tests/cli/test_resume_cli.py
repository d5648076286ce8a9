"""``kill -9`` mid-epoch, then ``vlgen fit --ckpt_path`` the last checkpoint: the final trainable weights are bitwise
those of an uninterrupted run, for the JSON + folder image module, the video module and the text corpus module
(:mod:`vlgen.data.resume`: the epoch's order fixed by seed and epoch, the position in every checkpoint, each sample's
augmentation seeded by its position)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, vlgen

TINY = REPO / "configs" / "tiny" / "linear.yaml"
VIDEO = REPO / "configs" / "tiny" / "video_evlgen.yaml"
STAGE0 = REPO / "configs" / "tiny" / "pformer_stage0.yaml"


def checkpoints(every: int, dirpath: Path | None = None) -> list[dict]:
    """A checkpoint every ``every`` steps, each kept (``step=N.ckpt``), in ``dirpath`` (default: the logger's)."""
    init = {"save_last": True, "save_top_k": -1, "every_n_train_steps": every, "filename": "{step}"}
    if dirpath is not None:
        init["dirpath"] = str(dirpath)
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": init}]


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def kill_resume_and_compare(work: Path, args: list[str], steps: int, every: int, kill_after: int) -> None:
    """An uninterrupted run of ``steps``; a run killed (``kill -9``) a little after its checkpoint at ``kill_after``,
    resumed from that checkpoint to ``steps``; the two final checkpoints' trainable weights compared bitwise. Each
    run checkpoints every ``every`` steps into ``work/<run>``."""
    start = time.perf_counter()
    run_args = {}
    for run in ("straight", "killed", "resumed"):
        (work / f"{run}.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": checkpoints(every, work / run)}}))
        run_args[run] = [*args, "--config", str(work / f"{run}.yaml")]
    vlgen("fit", *run_args["straight"], cwd=work)

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vlgen.cli", "fit", *run_args["killed"], "--trainer.max_steps", str(steps * 4)]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = work / "killed" / f"step={kill_after}.ckpt"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not target.is_file():
            time.sleep(0.2)
        time.sleep(1.5)  # written in full, and a step or more past it: mid-epoch
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished (it was asked for 4x the steps)
    assert torch.load(target, map_location="cpu", weights_only=True)["global_step"] == kill_after

    resumed = vlgen("fit", *run_args["resumed"], "--ckpt_path", str(target), cwd=work)
    assert "not resumable" not in resumed.stderr
    assert "resuming" in resumed.stderr  # the data module's line: where the stream continues
    final = f"step={steps}.ckpt"
    a, b = trainable(work / "straight" / final), trainable(work / "resumed" / final)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    early = trainable(work / "straight" / f"step={kill_after}.ckpt")
    assert any(not torch.equal(a[k], early[k]) for k in a)  # it trained after the resume point
    print(f"kill -9 and resume: {time.perf_counter() - start:.0f} s")


def trainer(steps: int, every: int, **kw) -> dict:
    return {"max_steps": steps, "limit_val_batches": 1, "log_every_n_steps": every, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, **kw}  # fmt: skip


def image_override(built: Path, steps: int) -> dict:
    """The tiny linear config on the small shapes world of ``built``: batches of 8, one worker, a checkpoint-friendly
    log cadence of 4, the schedule over ``steps``."""
    return {
        "trainer": trainer(steps, 4),
        "model": {"init_args": {"encoder": {"init_args": {"checkpoint_path": str(built / "encoder.pth")}},
                                "llm": {"init_args": {"name_or_path": str(built / "lm")}},
                                "optim": {"warmup_steps": 5, "max_steps": steps}}},
        "data": {"init_args": {"root": str(built / "shapes"), "generate": None, "batch_size": 8,
                               "eval_batch_size": 8, "num_workers": 1}},
    }  # fmt: skip


def write_args(work: Path, override: dict, config: Path) -> list[str]:
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    return ["--config", str(config), "--config", str(work / "override.yaml")]


@pytest.mark.slow
def test_image_folder_module_resumes_bitwise_after_kill_9(tmp_path, built):
    """120 pairs in batches of 8, one dataloader worker: 15 steps an epoch; killed after its checkpoint at step 8,
    resumed there, compared at step 24 (the rest of epoch 0, then epoch 1, whose order and augmentations count too)."""
    steps = 24
    kill_resume_and_compare(tmp_path, write_args(tmp_path, image_override(built, steps), TINY), steps, 4, kill_after=8)


@pytest.mark.slow
def test_video_module_resumes_bitwise_after_kill_9(tmp_path, built, tiny_bert_dir):
    """60 clip-caption pairs (random head/tail frames) in batches of 8, one worker: 8 steps an epoch; killed after
    step 5, resumed there, compared at step 10 (epoch 1 included)."""
    steps = 10
    image = {"init_args": {"checkpoint_path": str(built / "encoder.pth")}}
    override = {
        "trainer": trainer(steps, 5),
        "model": {"init_args": {"encoder": {"init_args": {"image": image}},
                                "bridge": {"init_args": {"bert": str(tiny_bert_dir)}},
                                "llm": {"init_args": {"name_or_path": str(built / "video-lm")}},
                                "optim": {"warmup_steps": 3, "max_steps": steps}}},
        "data": {"init_args": {"root": str(built / "video"), "generate": None, "batch_size": 8,
                               "eval_batch_size": 8, "num_workers": 1}},
    }  # fmt: skip
    kill_resume_and_compare(tmp_path, write_args(tmp_path, override, VIDEO), steps, 5, kill_after=5)


@pytest.mark.slow
def test_text_corpus_module_resumes_bitwise_after_kill_9(tmp_path, built, tiny_bert_dir):
    """P-Former stage 0 on the world's corpus (400 sentences, batches of 32: the stream cycles at step 12), one
    dataloader worker: killed after its checkpoint at step 8, resumed there, compared at step 16."""
    steps = 16
    override = {
        "trainer": trainer(steps, 4, val_check_interval=8),
        "model": {"init_args": {"pformer": {"init_args": {"bert": str(tiny_bert_dir)}},
                                "llm": {"init_args": {"name_or_path": str(built / "lm")}},
                                "optim": {"warmup_steps": 5, "max_steps": steps}}},
        "data": {"init_args": {"train_files": [str(built / "shapes" / "corpus.txt")],
                               "val_files": [str(built / "shapes" / "val.json")], "generate": None,
                               "batch_size": 32, "num_workers": 1, "shuffle_buffer": 100}},
    }  # fmt: skip
    kill_resume_and_compare(tmp_path, write_args(tmp_path, override, STAGE0), steps, 4, kill_after=8)
