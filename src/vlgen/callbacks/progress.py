"""Training progress as plain lines, for runs whose output goes to a file (``make demo > log``, SLURM, nohup).

Lightning's progress bars (Rich, TQDM) redraw one line in place: in a log file that is nothing to read until the
run ends, or one carriage-return-joined line per batch. :class:`PlainProgress` is a Lightning ``ProgressBar`` that
writes a plain line every so often instead, so that ``tail -f log`` shows how far a run is and how long it has left::

    train step 120/3000 (4.0%)  epoch 0  loss 2.314  12.5 samples/s  0.4 s/step  elapsed 0:00:48  ETA 0:19:12
    val: 64 batches at step 500
    val: done in 12.1 s
    train done: step 3000/3000 (100.0%)  epoch 2  loss 1.102  in 0:20:03 (0.4 s/step)

The ``vlgen`` command picks it by itself when it has no terminal (:func:`use_plain_progress`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, TextIO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from vlgen.errors import ConfigError

ENV_VAR = "VLGEN_PROGRESS"
LOSS_KEYS = ("train/loss", "train_loss", "loss")  # the progress-bar metrics read as the loss, in this order


class PlainProgress(ProgressBar):
    """A progress "bar" of plain lines on stderr (flushed), for output that is not a terminal.

    During ``fit`` a line at every ``every_n_steps``-th optimiser step, and one after any step that ends
    ``every_n_seconds`` or more after the previous line. It holds the global step (of the total, with the share done
    and an ETA, when the total is known: from ``max_steps`` or ``Trainer.estimated_stepping_batches``; an iterable
    dataset without a length and no ``max_steps`` gives ``train step 120`` alone), the epoch, the loss (the
    ``train/loss`` progress-bar metric vlgen's models log, else the training step's output), samples per second (the
    batches' first dimension, times the number of processes) and seconds per step since the previous line
    (validation time left out), the time since training started and the ETA (at the run's average pace so far,
    validation included). Only optimiser steps count: with gradient accumulation a step is
    ``accumulate_grad_batches`` batches. A line when a validation (the sanity check included), test or predict loop
    starts and when it ends, a line every ``every_n_seconds`` during a long one, and a last line when training ends.

    Only global rank zero writes. As every progress bar, it is turned off by ``Trainer(enable_progress_bar=False)``
    (Lightning refuses a progress-bar callback then) and is the only progress bar of its trainer.

    The ``vlgen`` command adds it to a trainer whose progress bar is on and that has none configured, when stdout
    or stderr is not a terminal; on a terminal Lightning's own bar stays. The environment variable
    ``VLGEN_PROGRESS`` forces the choice: ``plain`` (these lines, even on a terminal) or ``bar`` (Lightning's bar,
    even in a file). Another progress bar named in the config (``--trainer.callbacks+=TQDMProgressBar``) is kept.

    Args:
        every_n_steps: optimiser steps between two training lines.
        every_n_seconds: the most seconds between two lines (training or evaluation); 0 leaves the steps alone.
        stream: where the lines go; None for ``sys.stderr`` as it is when a line is written.
    """

    def __init__(self, every_n_steps: int = 50, every_n_seconds: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps < 1 or every_n_seconds < 0:
            raise ConfigError(
                f"PlainProgress: every_n_steps must be >= 1 and every_n_seconds >= 0, got {every_n_steps} and "
                f"{every_n_seconds}"
            )
        self.every_n_steps, self.every_n_seconds, self.stream = every_n_steps, every_n_seconds, stream
        self._enabled = True
        self._total_steps: int | None = None
        self._train_start = self._window_start = 0.0
        self._start_step = self._window_step = self._last_step = self._epoch = 0
        self._window_samples = 0
        self._window_eval_seconds = 0.0  # spent in validation since the last training line
        self._eval_start = self._eval_line = 0.0
        self._eval_batches = 0

    # Lightning's ProgressBar interface.

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        """Write nothing (Lightning calls it on the ranks other than zero, and around its tuners' trial runs)."""
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.print``: to stdout, as Lightning's bars do (plain lines need no clearing first)."""
        print(*args, **kwargs)

    # Training.

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._total_steps = total_steps(trainer)
        self._train_start = self._window_start = time.monotonic()
        self._start_step = self._window_step = self._last_step = trainer.global_step
        self._epoch = trainer.current_epoch
        self._window_samples, self._window_eval_seconds = 0, 0.0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._window_samples += count_samples(batch) or 0
        self._epoch = trainer.current_epoch  # at the end of training Lightning has counted one more
        step = trainer.global_step
        if step == self._last_step:  # a batch of an accumulation, or one whose step was skipped
            return
        self._last_step = step
        now = time.monotonic()
        due = step % self.every_n_steps == 0  # lines at round steps (50, 100, ...), whatever the time lines between
        due = due or (self.every_n_seconds > 0 and now - self._window_start >= self.every_n_seconds)
        if not due or not self._writes(trainer):
            return
        self._write(self._train_line(trainer, outputs, now))
        self._window_start, self._window_step, self._window_samples = now, step, 0
        self._window_eval_seconds = 0.0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._writes(trainer):
            return
        step, seconds = trainer.global_step, time.monotonic() - self._train_start
        parts = [f"train done: {_step(step, self._total_steps)}", f"epoch {self._epoch}"]
        loss = read_loss(trainer, None)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        pace = f" ({_num(seconds / (step - self._start_step))} s/step)" if step > self._start_step else ""
        parts.append(f"in {_duration(seconds)}{pace}")
        self._write("  ".join(parts))

    def _train_line(self, trainer: Trainer, outputs: Any, now: float) -> str:
        """The periodic training line (see the class)."""
        step, total = trainer.global_step, self._total_steps
        parts = [f"train {_step(step, total)}", f"epoch {trainer.current_epoch}"]
        loss = read_loss(trainer, outputs)
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        seconds = max(now - self._window_start - self._window_eval_seconds, 1e-9)  # training time of the window
        if self._window_samples:
            parts.append(f"{_num(self._window_samples * trainer.world_size / seconds)} samples/s")
        parts.append(f"{_num(seconds / max(step - self._window_step, 1))} s/step")
        elapsed = now - self._train_start
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._start_step
        if total is not None and done > 0:
            parts.append(f"ETA {_clock(elapsed / done * max(total - step, 0))}")
        return "  ".join(parts)

    # Evaluation: the sanity check, validation, test, predict.

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        at = f" at step {trainer.global_step}" if fitting else ""
        self._eval_begin(trainer, batches, at)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self._eval_batch(trainer, batches)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seconds = self._eval_finish(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._window_eval_seconds += seconds  # (the sanity check runs before training starts: reset there)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_begin(trainer, trainer.num_test_batches)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer, trainer.num_test_batches)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_finish(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_begin(trainer, trainer.num_predict_batches)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer, trainer.num_predict_batches)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_finish(trainer)

    def _eval_begin(self, trainer: Trainer, batches: Any, at: str = "") -> None:
        self._eval_start = self._eval_line = time.monotonic()
        self._eval_batches = 0
        if self._writes(trainer):
            total = _batches(batches)
            count = "? batches" if total is None else f"{total} batch" + ("" if total == 1 else "es")
            self._write(f"{_stage(trainer)}: {count}{at}")

    def _eval_batch(self, trainer: Trainer, batches: Any) -> None:
        """Count one evaluation batch; a line when ``every_n_seconds`` passed since the loop's previous line."""
        self._eval_batches += 1
        now = time.monotonic()
        if not self.every_n_seconds or now - self._eval_line < self.every_n_seconds or not self._writes(trainer):
            return
        self._eval_line = now
        total, done, elapsed = _batches(batches), self._eval_batches, now - self._eval_start
        parts = [f"{_stage(trainer)} batch {done}" + ("" if total is None else f"/{total} ({100 * done / total:.1f}%)")]
        parts.append(f"elapsed {_clock(elapsed)}")
        if total is not None:
            parts.append(f"ETA {_clock(elapsed / done * max(total - done, 0))}")
        self._write("  ".join(parts))

    def _eval_finish(self, trainer: Trainer) -> float:
        """Write the loop's last line; the seconds it took."""
        seconds = time.monotonic() - self._eval_start
        if self._writes(trainer):
            self._write(f"{_stage(trainer)}: done in {_duration(seconds)}")
        return seconds

    # Writing.

    def _writes(self, trainer: Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def use_plain_progress() -> bool:
    """Whether the ``vlgen`` command shows :class:`PlainProgress` rather than Lightning's bar: when stdout or
    stderr is not a terminal, unless ``VLGEN_PROGRESS`` says ``plain`` or ``bar``."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("plain", "bar"):
        return forced == "plain"
    if forced:
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]}: expected plain or bar (unset: plain lines without a tty)")
    return not all(_isatty(stream) for stream in (sys.stdout, sys.stderr))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def total_steps(trainer: Trainer) -> int | None:
    """The optimiser steps the fit ends at (``max_steps``, or what the epochs come to), or None when unknown."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # different accumulations per epoch, a loader that cannot say
        total = trainer.max_steps
    if total is None or not math.isfinite(total) or total <= 0:
        return None
    return int(total)


def count_samples(batch: Any) -> int | None:
    """Samples in a batch: a vlgen batch dict's ``pixels`` (first dimension) or ``captions``, else the first
    per-sample field of a dict (``num_skipped`` aside) or sequence, or a tensor's first dimension; None if unknown."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        for key in ("pixels", "captions"):
            if key in batch:
                return count_samples(batch[key]) if isinstance(batch[key], Tensor) else len(batch[key])
        values = [v for k, v in batch.items() if k != "num_skipped" and isinstance(v, Tensor | list | tuple)]
        return count_samples(values[0]) if values else None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        first = batch[0]
        return count_samples(first) if isinstance(first, Tensor | Mapping) else len(batch)
    return None


def read_loss(trainer: Trainer, outputs: Any) -> float | None:
    """The training loss to show: the progress-bar metric ``train/loss`` (or ``train_loss``, ``loss``), else the
    training step's output (undoing Lightning's division by ``accumulate_grad_batches``)."""
    metrics = trainer.progress_bar_metrics
    for key in LOSS_KEYS:
        value = metrics.get(key)
        if isinstance(value, int | float):
            return float(value)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, Tensor) and loss.numel() == 1:
        scale = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
        return float(loss.detach()) * scale
    return None


def _stage(trainer: Trainer) -> str:
    if trainer.sanity_checking:
        return "sanity check"
    if trainer.testing:
        return "test"
    if trainer.predicting:
        return "predict"
    return "val"


def _batches(batches: Any) -> int | None:
    """The batches of an evaluation loop (Lightning gives one count per dataloader), or None when unknown."""
    total = sum(batches) if isinstance(batches, list | tuple) else batches
    return int(total) if isinstance(total, int | float) and math.isfinite(total) else None


def _step(step: int, total: int | None) -> str:
    return f"step {step}" if total is None else f"step {step}/{total} ({100 * step / total:.1f}%)"


def _num(x: float) -> str:
    """A rate with about three significant digits and no exponent."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.2g}"


def _clock(seconds: float) -> str:
    """``H:MM:SS`` (``1 day, H:MM:SS`` past a day)."""
    return str(timedelta(seconds=int(seconds)))


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else _clock(seconds)
