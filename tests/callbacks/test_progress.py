"""PlainProgress: plain progress lines on stderr every N steps or seconds (of a known or unknown total), evaluation
lines, rank zero only; and the ``vlgen`` command choosing it when its output is not a terminal."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vlgen.callbacks import PlainProgress
from vlgen.callbacks.progress import count_samples, read_loss, use_plain_progress
from vlgen.cli import wants_plain_progress
from vlgen.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cli_helpers import REPO, tiny_encoder, tiny_lm, vlgen

TRAIN_LINE = re.compile(
    r"^train step (\d+)/(\d+) \((\d+\.\d)%\)  epoch \d+  loss \d\S*  [\d.e+-]+ samples/s  [\d.e+-]+ s/step  "
    r"elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$"
)


class Pairs(Dataset):
    """``n`` random (x, y) pairs of a linear regression."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.x[i], "y": self.y[i]}


class Stream(IterableDataset):
    """Pairs without a length: the number of steps of an epoch is unknown beforehand."""

    def __iter__(self):
        yield from (Pairs(20)[i] for i in range(20))


class Toy(pl.LightningModule):
    """A linear regression logging ``train/loss`` on the progress bar, as vlgen's models do."""

    def __init__(self, log_loss: bool = True) -> None:
        super().__init__()
        self.layer, self.log_loss = nn.Linear(4, 1), log_loss

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(self.layer(batch["pixels"]), batch["y"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.step(batch)
        if self.log_loss:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.step(batch))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.step(batch))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch["pixels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(tmp_path: Path, progress: PlainProgress, **kwargs) -> pl.Trainer:
    settings = {"max_steps": 10, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=[progress], **settings,
    )  # fmt: skip


def loader(dataset: Dataset | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(dataset if dataset is not None else Pairs(), batch_size=batch_size)


def lines(text: str, prefix: str = "") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_a_line_every_n_steps_with_percent_eta_loss_and_rates(tmp_path, capsys):
    trainer(tmp_path, PlainProgress(every_n_steps=3, every_n_seconds=0)).fit(Toy(), loader())
    err = capsys.readouterr().err
    train = lines(err, "train step")
    assert [int(TRAIN_LINE.match(line).group(1)) for line in train] == [3, 6, 9], err
    assert all(TRAIN_LINE.match(line).group(2) == "10" for line in train)
    assert TRAIN_LINE.match(train[0]).group(3) == "30.0"
    assert lines(err, "train done: step 10/10 (100.0%)  epoch 0  loss "), err
    assert " s/step)" in lines(err, "train done")[0]


def test_only_optimizer_steps_count_under_gradient_accumulation(tmp_path, capsys):
    # 16 batches of 4, 2 per step: 8 steps; samples/s counts every batch of the step
    progress = PlainProgress(every_n_steps=2, every_n_seconds=0)
    trainer(tmp_path, progress, max_steps=-1, max_epochs=1, accumulate_grad_batches=2).fit(Toy(), loader())
    err = capsys.readouterr().err
    train = lines(err, "train step")
    assert [int(TRAIN_LINE.match(line).group(1)) for line in train] == [2, 4, 6, 8], err
    assert all(TRAIN_LINE.match(line).group(2) == "8" for line in train)
    for line in train:  # 8 samples a step
        rate, pace = (float(re.search(rf"([\d.e+-]+) {unit}", line).group(1)) for unit in ("samples/s", "s/step"))
        assert rate * pace == pytest.approx(8, rel=0.1), line
    assert lines(err, "train done: step 8/8")


def test_an_unknown_total_gives_the_step_without_percent_or_eta(tmp_path, capsys):
    progress = PlainProgress(every_n_steps=2, every_n_seconds=0)
    trainer(tmp_path, progress, max_steps=-1, max_epochs=1).fit(Toy(), loader(Stream()))  # 5 batches
    err = capsys.readouterr().err
    train = lines(err, "train step")
    assert [line.split("  ")[0] for line in train] == ["train step 2", "train step 4"], err
    assert not any("%" in line or "ETA" in line for line in train)
    assert all("samples/s" in line and "elapsed" in line for line in train)
    assert lines(err, "train done: step 5  epoch 0")


def test_every_n_seconds_comes_first_when_steps_are_slow(tmp_path, capsys):
    trainer(tmp_path, PlainProgress(every_n_steps=1000, every_n_seconds=1e-9), max_steps=4).fit(Toy(), loader())
    err = capsys.readouterr().err
    assert [int(TRAIN_LINE.match(line).group(1)) for line in lines(err, "train step")] == [1, 2, 3, 4], err


def test_the_loss_comes_from_the_step_output_when_not_logged(tmp_path, capsys):
    trainer(tmp_path, PlainProgress(every_n_steps=5, every_n_seconds=0), max_steps=5).fit(Toy(log_loss=False), loader())
    assert " loss " in lines(capsys.readouterr().err, "train step 5/5")[0]
    # Lightning divides the output by accumulate_grad_batches; the line shows the batch's loss
    fake = SimpleNamespace(
        progress_bar_metrics={},
        accumulate_grad_batches=4,
        lightning_module=SimpleNamespace(automatic_optimization=True),
    )
    assert read_loss(fake, {"loss": torch.tensor(0.5)}) == pytest.approx(2.0)
    assert read_loss(SimpleNamespace(progress_bar_metrics={"train/loss": 1.5}), None) == 1.5


def test_validation_test_and_predict_lines(tmp_path, capsys):
    progress = PlainProgress(every_n_steps=100, every_n_seconds=0)
    fit = trainer(tmp_path, progress, max_steps=6, limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=1)
    fit.fit(Toy(), loader(), loader(batch_size=8))
    fit.test(Toy(), loader(batch_size=16))
    fit.predict(Toy(), loader(batch_size=32))
    err = capsys.readouterr().err
    shown = [line for line in err.splitlines() if not line.startswith("train done")]
    assert [re.sub(r"done in [\d.]+ s", "done", line) for line in shown] == [
        "sanity check: 1 batch",
        "sanity check: done",
        "val: 2 batches at step 3",
        "val: done",
        "val: 2 batches at step 6",
        "val: done",
        "test: 4 batches",
        "test: done",
        "predict: 2 batches",
        "predict: done",
    ], err


def test_only_rank_zero_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    progress = PlainProgress(every_n_steps=1, every_n_seconds=0)
    trainer(tmp_path, progress, max_steps=3, limit_val_batches=1, num_sanity_val_steps=1).fit(Toy(), loader())
    assert not progress.is_enabled  # ProgressBar.setup disables it off rank zero
    progress.enable()  # and even if enabled again (Lightning's tuners do), the rank is checked per line
    trainer(tmp_path, progress, max_steps=3).fit(Toy(), loader())
    assert capsys.readouterr().err == ""


def test_it_is_lightnings_progress_bar(tmp_path):
    progress = PlainProgress()
    assert trainer(tmp_path, progress).progress_bar_callback is progress
    with pytest.raises(Exception, match="enable_progress_bar=False"):  # Lightning refuses it with the bar off
        trainer(tmp_path, PlainProgress(), enable_progress_bar=False)
    with pytest.raises(ConfigError, match="every_n_steps"):
        PlainProgress(every_n_steps=0)


def test_samples_of_vlgen_batches():
    assert count_samples({"pixels": torch.zeros(5, 3, 8, 8), "captions": ["a"] * 5, "num_skipped": 1}) == 5
    assert count_samples({"captions": ["a", "b"], "ids": ["1", "2"]}) == 2
    assert count_samples({"num_skipped": 0, "text": ["a", "b", "c"]}) == 3
    assert count_samples([torch.zeros(7, 2), torch.zeros(7)]) == 7
    assert count_samples(object()) is None


class Stderr:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("env", "stdout_tty", "stderr_tty", "plain"),
    [
        (None, True, True, False),
        (None, True, False, True),
        (None, False, True, True),
        ("plain", True, True, True),
        ("bar", False, False, False),
        (" Bar ", False, False, False),
    ],
)
def test_plain_without_a_terminal_unless_the_env_var_says(monkeypatch, env, stdout_tty, stderr_tty, plain):
    monkeypatch.setattr(sys, "stdout", Stderr(stdout_tty))
    monkeypatch.setattr(sys, "stderr", Stderr(stderr_tty))
    if env is None:
        monkeypatch.delenv("VLGEN_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("VLGEN_PROGRESS", env)
    assert use_plain_progress() is plain


def test_the_cli_keeps_a_configured_bar_and_a_bar_turned_off(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setenv("VLGEN_PROGRESS", "plain")
    assert wants_plain_progress({"enable_progress_bar": None, "callbacks": None}, {})
    assert not wants_plain_progress({"enable_progress_bar": False}, {})
    assert not wants_plain_progress({"barebones": True}, {})
    assert not wants_plain_progress({"callbacks": [TQDMProgressBar()]}, {})
    assert not wants_plain_progress({"callbacks": PlainProgress()}, {})
    assert not wants_plain_progress({}, {"callbacks": [TQDMProgressBar()]})
    monkeypatch.setenv("VLGEN_PROGRESS", "fancy")
    with pytest.raises(ConfigError, match="VLGEN_PROGRESS=fancy: expected plain or bar"):
        wants_plain_progress({}, {})


# --- the vlgen command, its stderr a pipe ---------------------------------------------------------------------------
@pytest.mark.slow
def test_vlgen_fit_without_a_terminal_writes_plain_progress(tmp_path):
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": {"num_train": 40, "num_val": 8}}
    world["init_args"].update(seed=0, num_test=8, num_text=300)
    encoder = tiny_encoder(tmp_path, world)
    encoder["build_if_missing"]["init_args"].update(num_images=32, steps=3)
    override = {
        "trainer": {"max_steps": 5, "limit_val_batches": 1, "num_sanity_val_steps": 1, "logger": False},
        "model": {
            "init_args": {
                "encoder": {"init_args": encoder},
                "llm": {"init_args": tiny_lm(tmp_path, world, steps=3)},
                "optim": {"warmup_steps": 1},
            }
        },
        "data": {"init_args": {"root": str(tmp_path / "shapes"), "generate": world, "batch_size": 8}},
    }
    override["data"]["init_args"].update(eval_batch_size=8, num_workers=0)
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    config = ["--config", str(REPO / "configs" / "tiny" / "linear.yaml"), "--config", str(tmp_path / "override.yaml")]

    # Chosen by the command (no progress bar configured): the evaluation lines and the last line.
    proc = vlgen("fit", *config, cwd=tmp_path)
    shown = lines(proc.stderr, "sanity check") + lines(proc.stderr, "val") + lines(proc.stderr, "train ")
    assert [re.sub(r"done in .*", "done", line) for line in shown[:-1]] == [
        "sanity check: 1 batch",
        "sanity check: done",
    ], proc.stderr  # (no validation: an epoch is 25 steps)
    assert re.fullmatch(r"train done: step 5/5 \(100\.0%\)  epoch 0  loss \S+  in \S+ s \(\S+ s/step\)", shown[-1])
    assert "Epoch 0" not in proc.stdout + proc.stderr  # no Rich or TQDM bar

    # Chosen by the user, with its own cadence: kept (one progress bar, not two).
    plain = ["--trainer.callbacks+=vlgen.callbacks.PlainProgress", "--trainer.callbacks.every_n_steps=2"]
    proc = vlgen("fit", *config, *plain, "--trainer.max_steps=6", cwd=tmp_path)
    train = lines(proc.stderr, "train step")
    assert [TRAIN_LINE.match(line).group(1) for line in train] == ["2", "4", "6"], proc.stderr
