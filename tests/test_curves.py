"""Training curves from CSV logs (`vlgen.curves`): sparse and damaged metrics.csv files, the summary's numbers, the
PNG, and one metrics.csv written by Lightning's own CSVLogger during a real (toy) fit."""

from __future__ import annotations

import csv
import logging
import math

import pytest
from PIL import Image

from vlgen.curves import (
    LOSS,
    figure_size,
    find_metrics,
    plan_panels,
    read_metrics,
    read_runs,
    render_summary,
    running_mean,
    summarize,
)
from vlgen.curves import draw_curves as draw
from vlgen.errors import ConfigError

CIDER = {25: 0.10, 50: 0.40, 75: 0.30, 100: 0.35}  # best at step 50


def loss_at(step: int) -> float:
    """A falling, noisy loss whose lowest point is step 74 (0.25)."""
    return 0.25 if step == 74 else 3.0 - 0.02 * step + 0.3 * math.sin(step)


def fit_rows() -> list[dict[str, float]]:
    """Rows as a fit with a GroundingMonitor logs them: the loss every 2 steps, the monitor's figures and the
    validation scores each in rows of their own, every row with its step and epoch and nothing else."""
    rows: list[dict[str, float]] = []
    for step in range(0, 101):
        epoch = step // 50
        if step % 2 == 0:  # a one-loss model logs its only component too: the same numbers, no panel of its own
            rows.append({"epoch": epoch, "step": step, LOSS: loss_at(step), "train/lm_loss": loss_at(step)})
        if step in (25, 50, 75):
            figures = {"train/grounding_gap": step / 100, "train/grounding_gap_zero": step / 50}
            rows.append({"step": step, **figures, "train/prompt_norm_ratio": 1.5})
        if step in CIDER:
            rows.append({"epoch": epoch, "step": step, "val/CIDEr": CIDER[step], "val/skipped": 0.0})
    return rows


def write_csv(path, rows, extra_lines=()):
    """Write ``rows`` as Lightning's CSVLogger does (sorted header of every key, empty cells for the missing);
    ``extra_lines`` are (after row index, raw text) lines put in between, damage included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in rows for k in row})
    extra = dict(extra_lines)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow(row)
            if i in extra:
                handle.write(extra[i] + "\n")
    return path


def assert_real_png(path, panels):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == figure_size(panels)
        pixels = image.convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    inked = sum(n for n, rgb in colours if rgb != (255, 255, 255))
    assert inked > 0.03 * pixels.width * pixels.height  # axes, text and lines, not a blank canvas
    assert len(colours) > 50  # anti-aliased lines and text in several colours
    return {rgb for _, rgb in colours}


def test_sparse_rows_and_damaged_lines_are_read_cell_by_cell(tmp_path, caplog):
    rows = fit_rows()
    damage = [(3, "12,0"), (40, "garbage,not,a,row,at,all,really,no"), (41, "7,0,oops,,,,,")]
    path = write_csv(tmp_path / "version_0" / "metrics.csv", rows, damage)
    with caplog.at_level(logging.WARNING, logger="vlgen.curves"):
        run = read_metrics(path)
    assert run.malformed == 3 and run.name == "version_0"
    assert "3 malformed lines skipped" in caplog.text and "metrics.csv" in caplog.text
    steps, values = run.series[LOSS]
    assert steps == list(range(0, 101, 2)) and values[37] == pytest.approx(loss_at(74))
    assert run.series["val/CIDEr"] == (list(CIDER), list(CIDER.values()))
    assert run.series["train/grounding_gap"][0] == [25, 50, 75]  # from rows without an epoch
    assert "epoch" not in run.series and "step" not in run.series
    assert (run.last_step, run.last_epoch) == (100, 2)


def test_summary_numbers(tmp_path):
    run = read_metrics(write_csv(tmp_path / "run" / "metrics.csv", fit_rows()))
    s = summarize(run)
    assert (s.last_step, s.last_epoch) == (100, 2)
    assert (s.min_loss.value, s.min_loss.step) == (pytest.approx(0.25), 74)
    assert (s.last_loss.value, s.last_loss.step) == (pytest.approx(loss_at(100)), 100)
    assert (s.last_gap.value, s.last_gap.step) == (pytest.approx(0.75), 75)
    assert (s.best_val["val/CIDEr"].value, s.best_val["val/CIDEr"].step) == (pytest.approx(0.4), 50)
    assert s.last_val["val/CIDEr"].step == 100
    assert "val/skipped" not in s.best_val  # a skip counter that stayed 0
    text = render_summary(run)
    assert "training: last step 100 (epoch 2)" in text
    assert "min 0.2500 (step 74)" in text and "best 0.4000 (step 50)" in text
    assert "train/grounding_gap    last 0.7500 (step 75)" in text


def test_a_loss_among_the_validation_metrics_is_best_lowest(tmp_path):
    rows = [{"step": s, LOSS: 1.0, "train/itc": 2.0} for s in range(3)]
    rows += [{"step": 2, "val/loss": 0.9, "val/itc": 1.9, "val/exact_match": 0.2}]
    rows += [{"step": 5, "val/loss": 0.5, "val/itc": 2.5, "val/exact_match": 0.1}]
    best = summarize(read_metrics(write_csv(tmp_path / "r" / "metrics.csv", rows))).best_val
    assert {k: v.step for k, v in best.items()} == {"val/loss": 5, "val/itc": 2, "val/exact_match": 2}


def test_draws_a_png_of_every_panel(tmp_path):
    run = read_metrics(write_csv(tmp_path / "run" / "metrics.csv", fit_rows()))
    titles = [p.title for p in plan_panels([run])]
    # loss, both gaps in one panel, the norm ratio, CIDEr; not the idle val/skipped
    assert titles == ["training loss", "grounding gap (nats/token)", "prompt norm / token embedding norm", "val/CIDEr"]
    out = draw([run], tmp_path / "out" / "curves.png")
    assert out == tmp_path / "out" / "curves.png" and not list(out.parent.glob(".*partial"))
    colours = assert_real_png(out, panels=4)
    assert figure_size(4) == (1500, 680)
    assert (31, 119, 180) in colours  # matplotlib's first line colour: the curves are drawn


def test_several_runs_one_figure_and_finding_them(tmp_path):
    parent = tmp_path / "vlgen"
    for version in (0, 2, 10):
        rows = [{"step": s, LOSS: (version + 1) / (s + 1)} for s in range(20)]
        write_csv(parent / f"version_{version}" / "metrics.csv", [*rows, {"step": 19, "val/Bleu_4": 0.1 * version}])
    write_csv(parent / "version_11" / "metrics.csv", [{"step": 0, "test/CIDEr": 1.0}])
    (parent / "version_11" / "predictions.jsonl").write_text("")  # a test run: skipped in a parent
    assert find_metrics(parent) == [parent / "version_10" / "metrics.csv"]
    every = find_metrics(parent, all_versions=True)
    assert [p.parent.name for p in every] == ["version_0", "version_2", "version_10"]
    assert find_metrics(parent / "version_2") == [parent / "version_2" / "metrics.csv"]
    runs = read_runs(every)
    assert [r.name for r in runs] == ["version_0", "version_2", "version_10"]
    assert_real_png(draw(runs, tmp_path / "all.png"), panels=2)
    other = write_csv(tmp_path / "other" / "version_0" / "metrics.csv", [{"step": 0, LOSS: 1.0}])
    assert [r.name for r in read_runs([every[0], other])] == ["vlgen/version_0", "other/version_0"]
    with pytest.raises(ConfigError, match=r"nowhere/metrics\.csv does not exist, nor a fit run's version_\*/"):
        find_metrics(tmp_path / "nowhere")


def test_a_header_written_again_mid_file_names_the_columns_below_it(tmp_path):
    path = write_csv(tmp_path / "r" / "metrics.csv", [{"step": 0, LOSS: 2.0}, {"step": 1, LOSS: 1.5}])
    with path.open("a") as handle:  # a second log appended, wider
        handle.write("epoch,step,train/loss,val/CIDEr\n0,2,1.25,\n0,2,,0.5\n")
    run = read_metrics(path)
    assert run.series[LOSS] == ([0, 1, 2], [2.0, 1.5, 1.25]) and run.series["val/CIDEr"] == ([2], [0.5])
    assert run.malformed == 0


def test_nothing_to_draw_and_not_a_metrics_file(tmp_path):
    test_only = read_metrics(write_csv(tmp_path / "t" / "metrics.csv", [{"step": 0, "test/CIDEr": 1.0}]))
    with pytest.raises(ConfigError, match="no training or validation metrics to draw"):
        draw([test_only], tmp_path / "x.png")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match=r"empty\.csv: empty, or not a CSVLogger metrics file"):
        read_metrics(tmp_path / "empty.csv")


def test_running_mean():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([4.0], 5) == [4.0]


def test_a_real_csv_logger_fit(tmp_path):
    """A 20-step fit of a toy module with Lightning's CSVLogger (flushing every 5 steps, so keys logged later make
    it rewrite the file with a wider header), a grounding figure logged straight to the logger, then the curves."""
    import lightning
    import torch
    from lightning.pytorch.loggers import CSVLogger

    class Toy(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.scores: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train/loss", loss)
            if self.global_step == 12:
                self.logger.log_metrics({"train/grounding_gap": 0.5}, step=self.global_step)
            return loss

        def validation_step(self, batch, batch_idx):
            self.scores.append(float(torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])))

        def on_validation_epoch_end(self):
            self.log("val/CIDEr", 1.0 / (1.0 + self.scores[-1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = lightning.Trainer(
        max_steps=20,
        val_check_interval=5,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="vlgen", flush_logs_every_n_steps=5),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Toy(), loader, loader)
    (path,) = find_metrics(tmp_path / "vlgen")
    assert path == tmp_path / "vlgen" / "version_0" / "metrics.csv"
    run = read_metrics(path)
    assert run.malformed == 0
    # Lightning logs a training figure at its step's 0-based index, validation after the 5th, 10th, 15th batch
    assert run.series[LOSS][0] == list(range(1, 20, 2)) and run.series["val/CIDEr"][0] == [4, 9, 14]
    assert run.series["train/grounding_gap"] == ([12], [0.5])
    s = summarize(run)
    losses = run.series[LOSS][1]
    assert s.min_loss.value == min(losses) and s.best_val["val/CIDEr"].value == max(run.series["val/CIDEr"][1])
    assert_real_png(draw([run], path.parent / "curves.png"), panels=3)
