"""Requeue a SLURM job before its time runs out, from a checkpoint an uninterrupted run would resume exactly.

SLURM sends a signal (``#SBATCH --signal=SIGUSR1@120``) shortly before it stops a job at its time limit or for a
preemption. Lightning's own SLURM handler writes its ``hpc_ckpt_N.ckpt`` the moment the signal arrives, which can be
in the middle of a training step: after the step's batch was drawn and its dropout masks sampled, before the update.
Such a checkpoint resumes, but not to what an uninterrupted run computes. :class:`Requeue` takes the signal over and
acts at the end of the step it arrived in, where every checkpoint of vlgen is written (the data position, the random
generators and the weights all agree there):

1. every rank notes the signal; at the end of each step the ranks agree whether any of them got it (one scalar
   all-reduce under DDP), so all of them stop at the same step;
2. the checkpoint goes to ``DEFAULT_ROOT_DIR/hpc_ckpt_N.ckpt``, where Lightning looks when a fit under SLURM starts
   without ``--ckpt_path``;
3. rank zero asks ``scontrol requeue JOB_ID`` for the same job (the same ``SLURM_JOB_ID``, so the same run directory
   in ``scripts/slurm/fit.sbatch``), and the fit ends cleanly after that step.

The requeued job runs the same command, and Lightning restores the hpc checkpoint by itself. Outside SLURM the
callback does nothing. Give ``SLURMEnvironment`` ``auto_requeue: false`` with it (``configs/cluster/slurm_ddp.yaml``
does), or Lightning registers its own immediate handler as well (this callback then replaces it for the fit).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


class Requeue(Callback):
    """On ``signal_name`` (default SIGUSR1) under SLURM: checkpoint at the end of the step, requeue, stop (see the
    module).

    Args:
        signal_name: the signal the job script asks SLURM for (``--signal=SIGUSR1@120``).
        requeue: call ``scontrol requeue`` (false: only checkpoint and stop, e.g. when the script requeues itself).
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        try:
            self.signum = signal.Signals[signal_name]
        except KeyError:
            from vlgen.errors import ConfigError

            raise ConfigError(f"Requeue.signal_name: {signal_name!r} is not a signal (e.g. SIGUSR1, SIGTERM)") from None
        self.requeue = requeue
        self.received = False
        self._previous: Any = None
        self._active = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # acted on at the end of the step; nothing else is safe inside a signal handler

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = SLURMEnvironment.detect() and slurm_job_id() is not None
        if not self._active:
            return
        self._previous = signal.signal(self.signum, self._note)  # after Lightning's own registration: ours wins
        log.info(f"requeue: on {self.signum.name} the fit checkpoints at the end of its step and requeues job "
                 f"{slurm_job_id()}")  # fmt: skip

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self._active:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):  # any rank got it: all stop
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # a collective: every rank calls it
        log.warning(f"requeue: {self.signum.name} received; step {trainer.global_step} saved to {path}")
        if trainer.is_global_zero and self.requeue:
            job = slurm_job_id()
            try:
                result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, check=False)
                ok, why = result.returncode == 0, (result.stderr or result.stdout).strip()
            except OSError as err:
                ok, why = False, str(err)
            if ok:
                log.warning(f"requeue: job {job} requeued; it resumes from {path}")
            else:
                log.warning(f"requeue: `scontrol requeue {job}` failed ({why}); resume by hand with --ckpt_path {path}")
        trainer.should_stop = True
        self._active = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
