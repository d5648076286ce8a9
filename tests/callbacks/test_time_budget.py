"""TimeBudget plans a run's steps and its lr schedule from the speed it measures, and never overruns its budget.

A fake clock advances a fixed time per training step, so the plans are exact and no test depends on this machine.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from vlgen.callbacks import TimeBudget
from vlgen.errors import ConfigError
from vlgen.models.base import WarmupCosine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timed(BoringModel):
    """A step costs ``seconds`` on the clock (``slow_from``: from that step on, ``slow`` seconds instead)."""

    def __init__(self, clock: Clock, seconds: float, slow_from: int | None = None, slow: float = 0.0) -> None:
        super().__init__()
        self.clock, self.seconds, self.slow_from, self.slow = clock, seconds, slow_from, slow
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        late = self.slow_from is not None and self.global_step >= self.slow_from
        self.clock.now += self.slow if late else self.seconds
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup=2, total=1000, floor=0.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(model: Timed, budget: TimeBudget, root, max_steps: int = 1000) -> pl.Trainer:
    budget.clock = model.clock
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=[budget], logger=False, enable_checkpointing=False, default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model)
    return trainer


def test_plans_the_steps_that_fit_and_ends_the_cosine_on_the_last_one(tmp_path):
    clock = Clock()
    model = Timed(clock, seconds=0.5)
    budget = TimeBudget(minutes=0.5, measure_after=2, measure_steps=4, remeasure_every=10)
    trainer = fit(model, budget, tmp_path)
    assert budget.seconds_per_step == pytest.approx(0.5)
    assert budget.planned == 60 and trainer.global_step == 60  # 30 s at 0.5 s per step
    assert model.lrs[-1] < 0.01 * max(model.lrs)  # the cosine reached its end at the last step, not at step 1000
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule.total == 60
    summary = json.loads((tmp_path / "time_budget.json").read_text())  # what the run reached, for the demo to show
    assert summary["steps"] == 60 and summary["minutes"] == pytest.approx(0.5, abs=0.01)
    assert summary["text"] == "60 steps in 0.5 of 0.5 budgeted minutes, 0.50 s per step on this machine"


def test_a_slower_phase_moves_the_plan_and_the_budget_holds(tmp_path):
    clock = Clock()
    model = Timed(clock, seconds=0.5, slow_from=20, slow=1.5)  # three times slower after step 20
    budget = TimeBudget(minutes=0.5, measure_after=2, measure_steps=4, remeasure_every=5)
    trainer = fit(model, budget, tmp_path)
    assert budget.seconds_per_step == pytest.approx(1.5)
    assert trainer.global_step < 60
    spent = clock.now - 100.0
    assert spent <= 30.0 + 1.5  # at most the step that crossed the budget


def test_the_configs_max_steps_stays_the_ceiling(tmp_path):
    clock = Clock()
    model = Timed(clock, seconds=0.1)
    budget = TimeBudget(minutes=1.0, measure_after=1, measure_steps=3)
    trainer = fit(model, budget, tmp_path, max_steps=40)
    assert budget.planned == 40 and trainer.global_step == 40


def test_stops_at_the_budget_even_before_a_plan(tmp_path):
    clock = Clock()
    model = Timed(clock, seconds=10.0)
    budget = TimeBudget(minutes=0.5, measure_after=3, measure_steps=10)
    trainer = fit(model, budget, tmp_path)
    assert trainer.global_step == 3 and budget.planned is None  # 30 s spent in three steps


def test_the_spent_time_travels_in_its_state(tmp_path):
    budget = TimeBudget(minutes=2.0)
    budget.load_state_dict({"spent_s": 90.0, "planned": 120, "seconds_per_step": 0.75})
    assert budget.state_dict() == {"spent_s": 90.0, "planned": 120, "seconds_per_step": 0.75}
    resumed = TimeBudget(minutes=2.0)
    resumed.load_state_dict(budget.state_dict())
    clock = Clock()
    model = Timed(clock, seconds=1.0)
    trainer = fit(model, resumed, tmp_path)
    assert trainer.global_step == 30  # the 30 s left of the budget, not 120 s


@pytest.mark.parametrize(
    "kwargs", [{"minutes": 0}, {"minutes": 1, "measure_steps": 0}, {"minutes": 1, "measure_after": -1}]
)
def test_bad_arguments_stop_with_one_line(kwargs):
    with pytest.raises(ConfigError, match="TimeBudget"):
        TimeBudget(**kwargs)


def test_every_rank_follows_rank_zeros_plan(tmp_path, monkeypatch):
    """Under DDP the ranks must stop at the same step: a rank other than 0 decides nothing from its own clock and
    applies what rank 0 broadcasts (here: a plan of 7 steps at the third step, whatever this rank measured)."""
    clock = Clock()
    model = Timed(clock, seconds=0.01)
    budget = TimeBudget(minutes=10.0, measure_after=1, measure_steps=2)
    sent = []  # what this rank's callback sends: nothing (Lightning broadcasts paths of its own, passed through)

    def broadcast(obj, src=0):
        if obj is not None:
            return obj
        sent.append(obj)
        return ("plan", (7, 2.0)) if len(sent) == 3 else None  # rank 0's decisions, as they arrive

    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "broadcast", lambda self, obj, src=0: broadcast(obj, src))
    trainer = fit(model, budget, tmp_path)
    assert trainer.global_step == 7 and budget.planned == 7 and budget.seconds_per_step == 2.0
    assert len(sent) == 7  # one decision per step, all of them rank 0's
