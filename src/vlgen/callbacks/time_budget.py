"""Train for a wall-clock budget: measure this machine's speed early, plan the steps (and the lr schedule) to fit."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from vlgen.errors import ConfigError
from vlgen.models.base import WarmupCosine

log = logging.getLogger(__name__)


class TimeBudget(Callback):
    """Fit a run into ``minutes`` of training on whatever machine runs it.

    The same number of steps takes twice as long on one machine as on another; a fixed ``max_steps`` then either
    overruns the time a user was promised or leaves it unused. This callback times the steps after the first
    ``measure_after`` (which pay for warm-up), and after ``measure_steps`` more sets the run's number of optimiser
    steps to what fits in the budget left - ``trainer.max_steps`` and the length of the learning-rate schedule
    (:class:`~vlgen.models.base.WarmupCosine`) alike, so the cosine still ends at the last step. It measures again
    every ``remeasure_every`` steps (periodic callbacks, a slower phase) and moves the plan when the speed moved;
    whatever happens, training stops once the budget is spent. One line at the first plan says the speed and the
    steps; one at the end says what was reached. The config's ``max_steps`` stays the ceiling: a fast machine does
    not train longer than the config asks.

    With several processes, rank 0's clock decides and every rank applies its decisions, so all stop at the
    same step. The budget counts training time from the first batch (world writing, model loading and the final
    checkpoint are outside it) and travels in checkpoints, so a resumed run spends only what is left. At the end
    the run's log directory gets ``time_budget.json``: steps, minutes, the budget, seconds per step.

    Args:
        minutes: the training budget.
        measure_after: steps left out of the timing (allocator and thread-pool warm-up).
        measure_steps: steps timed before the first plan.
        remeasure_every: steps between two later measurements (0: plan once).
    """

    def __init__(
        self, minutes: float, measure_after: int = 3, measure_steps: int = 10, remeasure_every: int = 50
    ) -> None:
        if minutes <= 0 or measure_after < 0 or measure_steps < 1 or remeasure_every < 0:
            raise ConfigError(
                "TimeBudget: minutes must be > 0, measure_after and remeasure_every >= 0, measure_steps >= 1"
            )
        self.budget_s = 60.0 * minutes
        self.measure_after, self.measure_steps, self.remeasure_every = measure_after, measure_steps, remeasure_every
        self.spent_s = 0.0  # training seconds of earlier processes (from a checkpoint)
        self.planned: int | None = None
        self.seconds_per_step: float | None = None
        self._ceiling: int | None = None
        self._start: float | None = None
        self._mark: tuple[int, float] | None = None  # (step, time) the current measurement started at
        self.clock = time.monotonic  # seconds; replaceable (tests)

    # --- time -----------------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.spent_s + (self.clock() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self.clock()
        self._ceiling = trainer.max_steps if trainer.max_steps >= 0 else None
        self._mark = None
        if self.planned is not None:  # resumed: the plan of the run that wrote the checkpoint
            trainer.fit_loop.epoch_loop.max_steps = self.planned

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Rank 0 decides, from its own clock, and every rank applies the same decision: ranks that planned apart
        # would wait for each other at the first step only some of them take.
        decision = self._decide(trainer.global_step) if trainer.is_global_zero else None
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision is None:
            return
        kind, value = decision
        if kind == "stop":
            trainer.should_stop = True
            return
        self.planned, self.seconds_per_step = value
        trainer.fit_loop.epoch_loop.max_steps = self.planned
        for config in trainer.lr_scheduler_configs:
            for fn in getattr(config.scheduler, "lr_lambdas", []):
                if isinstance(fn, WarmupCosine):
                    fn.total = self.planned

    def _decide(self, step: int) -> tuple[str, Any] | None:
        """``("stop", None)``, ``("plan", (steps, seconds per step))`` or ``None`` (go on as planned)."""
        now = self.clock()
        if self._elapsed() >= self.budget_s:
            log.info("time budget: %.1f min spent at step %d; stopping", self.budget_s / 60, step)
            return "stop", None
        if self._mark is None:
            if step >= self.measure_after:
                self._mark = (step, now)
            return None
        done = step - self._mark[0]
        if self.planned is None:
            if done < self.measure_steps:
                return None
        elif self.remeasure_every == 0 or done < self.remeasure_every:
            return None
        speed = (now - self._mark[1]) / done
        self._mark = (step, now)
        left = max(0.0, self.budget_s - self._elapsed())
        planned = step + int(left / speed)
        if self._ceiling is not None:
            planned = min(planned, self._ceiling)
        planned = max(planned, step + 1)
        if self.planned is None:
            log.info(
                "time budget: %.2f s per step on this machine -> %d steps in %.1f min of training%s",
                speed, planned, self.budget_s / 60,
                "" if self._ceiling is None or planned < self._ceiling else " (the config's max_steps)",
            )  # fmt: skip
        return "plan", (planned, speed)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        minutes, speed = self._elapsed() / 60, self.seconds_per_step
        summary = {
            "steps": trainer.global_step,
            "minutes": minutes,
            "budget_minutes": self.budget_s / 60,
            "seconds_per_step": speed,
            "planned": self.planned,
            "text": f"{trainer.global_step} steps in {minutes:.1f} of {self.budget_s / 60:.1f} budgeted minutes"
            + ("" if speed is None else f", {speed:.2f} s per step on this machine"),
        }
        log.info("time budget: %s", summary["text"])
        if trainer.is_global_zero and trainer.log_dir is not None:
            path = Path(trainer.log_dir) / "time_budget.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=1) + "\n")

    # --- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"spent_s": self._elapsed(), "planned": self.planned, "seconds_per_step": self.seconds_per_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spent_s = float(state_dict.get("spent_s", 0.0))
        self.planned = state_dict.get("planned")
        self.seconds_per_step = state_dict.get("seconds_per_step")
