"""A fit under SLURM that gets its requeue signal (SIGUSR1) checkpoints at the end of that step, asks ``scontrol
requeue`` for its job and stops; the requeued job (the same command, no ``--ckpt_path``) resumes from the hpc
checkpoint by itself and ends with bitwise the trainable weights of an uninterrupted run. Real processes: the
SLURM environment is the variables ``srun`` sets, and ``scontrol`` a script on ``PATH`` that records its call."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, vlgen
from test_resume_cli import TINY, checkpoints, image_override, trainable, write_args

CLUSTER = REPO / "configs" / "cluster" / "slurm_ddp.yaml"
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.strategy", "auto"]


def slurm_env(work: Path) -> dict[str, str]:
    """What ``srun`` gives one task of a one-node job, and a fake ``scontrol`` first on ``PATH``."""
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {work / "scontrol.calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vlgen-test",
             "SLURM_NODELIST": "localhost"}  # fmt: skip
    return {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_bitwise(tmp_path, built):
    steps = 24
    args = write_args(tmp_path, image_override(built, steps), TINY)
    for run in ("straight", "slurm"):
        (tmp_path / f"{run}.yaml").write_text(
            yaml.safe_dump({"trainer": {"callbacks+": checkpoints(4, tmp_path / run)}})
        )
    vlgen("fit", *args, "--config", str(tmp_path / "straight.yaml"), cwd=tmp_path)

    root = tmp_path / "job"
    job = [*args, "--config", str(CLUSTER), *ON_CPU, "--config", str(tmp_path / "slurm.yaml"),
           "--trainer.default_root_dir", str(root)]  # fmt: skip
    env = slurm_env(tmp_path)
    cmd = [sys.executable, "-m", "vlgen.cli", "fit", *job, "--trainer.max_steps", str(steps * 4)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (tmp_path / "slurm" / "step=8.ckpt").is_file():
            time.sleep(0.2)
        time.sleep(1.0)  # mid-epoch (15 steps an epoch), somewhere inside a step
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]  # it stopped by itself, after the step the signal arrived in
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    hpc = root / "hpc_ckpt_1.ckpt"
    stopped_at = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 8 <= stopped_at < steps, out[-3000:]
    assert "SIGUSR1 received" in out

    resumed = vlgen("fit", *job, "--trainer.max_steps", str(steps), cwd=tmp_path, env=env)  # no --ckpt_path
    assert "hpc_ckpt_1.ckpt" in resumed.stderr  # Lightning restored it by itself
    final = f"step={steps}.ckpt"
    a, b = trainable(tmp_path / "straight" / final), trainable(tmp_path / "slurm" / final)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise


def test_outside_slurm_the_callback_does_nothing(monkeypatch):
    from vlgen.callbacks import Requeue

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    callback = Requeue()
    before = signal.getsignal(signal.SIGUSR1)

    class Trainer:  # the callback reads nothing of it outside SLURM
        pass

    callback.on_train_start(Trainer(), None)
    assert signal.getsignal(signal.SIGUSR1) is before
    callback.on_train_batch_end(Trainer(), None)  # no error, no checkpoint


def test_a_signal_name_that_is_not_a_signal_stops_with_one_line():
    from vlgen.callbacks import Requeue
    from vlgen.errors import ConfigError

    with pytest.raises(ConfigError, match="SIGFOO"):
        Requeue("SIGFOO")
