"""Training curves from the CSV logs, for runs without W&B: ``vlgen report RUN_DIR --curves``.

``vlgen fit`` logs with Lightning's ``CSVLogger`` by default (``runs/vlgen/version_N/metrics.csv``). Its rows are
sparse: each holds ``step`` (and ``epoch``) and only the metrics logged at that step - ``train/loss`` every
``log_every_n_steps``, the grounding monitor's ``train/grounding_gap`` etc. in rows of their own, ``val/CIDEr`` and
the other validation scores at each validation. A key first logged late makes the logger rewrite the file with a
wider header, so early rows have empty cells for it. :func:`read_metrics` reads such a file cell by cell (empty
cells ignored; a truncated or garbled line, as a run killed mid-write leaves, skipped and counted; a header repeated
mid-file, as logs appended to one another leave, taken as the new header). :func:`draw_curves` draws one PNG:

* the training loss, raw (faint) and as a trailing running mean;
* the grounding gaps (with the zero line: a gap near 0 means the LLM ignores the prompts), the prompt-norm ratio
  and the prompt attention, when the run had a ``GroundingMonitor``;
* every other training figure (loss components, temperature) and logged learning rate;
* every validation metric over optimiser steps; per-type breakdowns (``val/answer_type=...``) share one panel.

Several runs give one line per run, labelled with the run directory's name. :func:`summarize` gives the numbers a
person checks first: steps, last and lowest loss, the last grounding gap, each validation metric's best and its step.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlgen.errors import ConfigError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
LOSS = "train/loss"
GAPS = ("train/grounding_gap", "train/grounding_gap_zero")
PROMPT = ("train/prompt_norm_ratio", "train/prompt_attention")
NOT_PLOTTED = ("step", "epoch")
PANEL_INCHES = (5.0, 3.4)  # one panel's width and height
MAX_COLUMNS = 3
DPI = 100
LINE_STYLES = ("-", "--", ":", "-.")
MAX_BREAKDOWN = 8  # a per-type breakdown with more members (VQAv2's 65 question types) is left out of the figure
TITLES = {
    LOSS: "training loss",
    "train/grounding_gap": "grounding gap (nats/token)",
    "train/prompt_norm_ratio": "prompt norm / token embedding norm",
    "train/prompt_attention": "attention share on the prompts",
}


@dataclass
class RunMetrics:
    """One run's ``metrics.csv`` as series: metric name -> (steps, values), in file order, finite values only."""

    path: Path
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    last_epoch: int | None = None
    malformed: int = 0  # lines skipped because they could not be read
    name: str = ""  # the label in the figure's legends: the run directory's name

    def __post_init__(self) -> None:
        self.name = self.name or self.path.parent.name

    def add(self, key: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)

    @property
    def last_step(self) -> int | None:
        """The highest step any figure was logged at: how far the run got (validation may come after the last
        ``log_every_n_steps`` row of the loss)."""
        return max((steps[-1] for steps, _ in self.series.values() if steps), default=None)


@dataclass
class Extreme:
    """A series' best (or last) value and the step it was logged at."""

    value: float
    step: int


@dataclass
class TrainingSummary:
    """The numbers a person checks first about a fit run."""

    last_step: int | None  # as logged: Lightning logs a training figure at the 0-based index of its step
    last_epoch: int | None
    last_loss: Extreme | None
    min_loss: Extreme | None
    last_gap: Extreme | None
    best_val: dict[str, Extreme]  # metric -> its best value (lowest for a loss, else highest)
    last_val: dict[str, Extreme]
    malformed: int


def find_metrics(path: str | Path, all_versions: bool = False) -> list[Path]:
    """The ``metrics.csv`` a run directory means: its own, else (for a parent such as ``runs/vlgen``) the one of its
    latest fit run's ``version_N`` directory, or with ``all_versions`` of each, oldest first. A CSV file is itself.

    Under the default logger ``vlgen test`` and ``vlgen predict`` take a ``version_N`` of their own too; they hold
    ``predictions.jsonl`` and no training curve, so a parent's are skipped (name such a directory to read it).
    """
    where = Path(path)
    if where.is_file() and where.suffix == ".csv":
        return [where]
    if (where / METRICS_FILE).is_file():
        return [where / METRICS_FILE]
    versions = sorted(
        (
            d
            for d in where.glob("version_*")
            if (d / METRICS_FILE).is_file() and not (d / "predictions.jsonl").is_file()
        ),
        key=lambda d: _version_key(d.name),
    )
    if not versions:
        raise ConfigError(
            f"{where / METRICS_FILE} does not exist, nor a fit run's version_*/{METRICS_FILE} below {where} (the "
            "curves are drawn from the CSV logs of `vlgen fit`: its default logger, or a CSVLogger)"
        )
    chosen = versions if all_versions else versions[-1:]
    return [d / METRICS_FILE for d in chosen]


def _version_key(name: str) -> tuple[int, int | str]:
    number = name.removeprefix("version_")
    return (0, int(number)) if number.isdigit() else (1, number)  # version_10 after version_9; named ones last


def read_metrics(path: str | Path, name: str = "") -> RunMetrics:
    """Read one CSVLogger ``metrics.csv`` (see the module docstring): every non-empty numeric cell of a line with a
    step; a line that cannot be read is skipped, and the count logged as one warning."""
    path = Path(path)
    run = RunMetrics(path, name=name)
    bad_lines: list[int] = []
    try:
        handle = path.open(newline="")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    with handle:
        reader = csv.DictReader(handle, restkey="\0extra")
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ConfigError(f"{path}: empty, or not a CSVLogger metrics file (its first line names no 'step' column)")
        for row in reader:
            cells = _cells(row, reader.fieldnames)
            if _is_header(cells):  # a header again: the columns of the lines below it
                reader.fieldnames = [c for c in cells if c is not None]
                continue
            parsed = _parse_row(row)
            if parsed is None:
                bad_lines.append(reader.line_num)
                continue
            step, epoch, values = parsed
            for key, value in values.items():
                run.add(key, step, value)
            if epoch is not None:
                run.last_epoch = epoch if run.last_epoch is None else max(run.last_epoch, epoch)
    run.malformed = len(bad_lines)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        log.warning("%s: %d malformed lines skipped (line %s)", path, len(bad_lines), shown)
    return run


def _cells(row: dict[str | None, object], fieldnames: list[str] | tuple[str, ...]) -> list[str | None]:
    """A DictReader row back as the line's cells, in order (extra cells included)."""
    cells = [row.get(name) for name in fieldnames]
    extra = row.get("\0extra")
    return [*cells, *extra] if isinstance(extra, list) else cells  # type: ignore[list-item]


def _is_header(cells: list[str | None]) -> bool:
    """Whether a line names columns: it has a ``step`` cell and no number."""
    if "step" not in cells:
        return False
    for cell in cells:
        try:
            float(cell or "x")
        except ValueError:
            continue
        return False
    return True


def _parse_row(row: dict[str | None, object]) -> tuple[int, int | None, dict[str, float]] | None:
    """(step, epoch, the numeric cells) of one line, or None when the line is malformed: more or fewer cells than
    the header, no integer step, or a cell that is not a number."""
    if "\0extra" in row or any(v is None for v in row.values()):
        return None
    try:
        step = int(float(row["step"]))  # type: ignore[arg-type]
        epoch = int(float(row["epoch"])) if row.get("epoch") else None  # type: ignore[arg-type]
        values = {
            key: float(cell)  # type: ignore[arg-type]
            for key, cell in row.items()
            if key not in NOT_PLOTTED and isinstance(key, str) and cell != ""
        }
    except (TypeError, ValueError, KeyError):
        return None
    return step, epoch, {k: v for k, v in values.items() if math.isfinite(v)}


def read_runs(paths: list[str | Path]) -> list[RunMetrics]:
    """Read several ``metrics.csv`` files, each labelled with its run directory's name (with its parent's too when
    two runs share a name, e.g. ``version_0`` of two experiments)."""
    files = [Path(p) for p in paths]
    names = [f.parent.name for f in files]
    if len(set(names)) < len(names):
        names = [f"{f.parent.parent.name}/{f.parent.name}" for f in files]
    return [read_metrics(f, name) for f, name in zip(files, names, strict=True)]


# --- the summary --------------------------------------------------------------------------------------------------
def lower_is_better(key: str, run: RunMetrics) -> bool:
    """Whether a validation metric is a loss: named so, or the validation twin of a training loss (``val/itc``)."""
    name = key.split("/", 1)[-1].lower()
    return "loss" in name or "perplexity" in name or (key.startswith("val/") and f"train/{name}" in run.series)


def summarize(run: RunMetrics) -> TrainingSummary:
    """Steps, last and lowest training loss, the last grounding gap, and each validation metric's best and last
    value with their steps (per-type breakdowns and skip counters left out)."""

    def last(key: str) -> Extreme | None:
        steps, values = run.series.get(key, ([], []))
        return Extreme(values[-1], steps[-1]) if values else None

    best_val, last_val = {}, {}
    for key in validation_metrics(run):
        steps, values = run.series[key]
        pick = min if lower_is_better(key, run) else max
        i = pick(range(len(values)), key=lambda j: values[j])  # the first step reaching the best value
        best_val[key], last_val[key] = Extreme(values[i], steps[i]), Extreme(values[-1], steps[-1])
    min_loss = None
    if run.series.get(LOSS):
        steps, values = run.series[LOSS]
        i = min(range(len(values)), key=lambda j: values[j])
        min_loss = Extreme(values[i], steps[i])
    return TrainingSummary(
        run.last_step, run.last_epoch, last(LOSS), min_loss, last(GAPS[0]), best_val, last_val, run.malformed
    )


def validation_metrics(run: RunMetrics) -> list[str]:
    """The run's validation metrics worth a line: not a per-type breakdown, not a skip counter that stayed 0."""
    return [k for k in run.series if k.startswith("val/") and "=" not in k and not _idle_counter(k, [run])]


def render_summary(run: RunMetrics) -> str:
    """The summary as the report prints it: indented lines under the run's own."""
    s = summarize(run)
    steps = "no step logged" if s.last_step is None else f"last step {s.last_step}"
    head = f"training: {steps}" + ("" if s.last_epoch is None else f" (epoch {s.last_epoch})")
    lines = [f"  {head}  ({run.path})"]
    if s.last_loss and s.min_loss:
        lines.append(
            f"  {LOSS:<22} last {s.last_loss.value:.4f} (step {s.last_loss.step})  "
            f"min {s.min_loss.value:.4f} (step {s.min_loss.step})"
        )
    if s.last_gap:
        lines.append(f"  {GAPS[0]:<22} last {s.last_gap.value:.4f} (step {s.last_gap.step})")
    for key, best in s.best_val.items():
        latest = s.last_val[key]
        word = "min" if lower_is_better(key, run) else "best"
        lines.append(
            f"  {key:<22} {word} {best.value:.4f} (step {best.step})  last {latest.value:.4f} (step {latest.step})"
        )
    if s.malformed:
        lines.append(f"  ({s.malformed} malformed lines of {run.path.name} skipped)")
    return "\n".join(lines)


# --- the figure ---------------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One axes of the figure: its title, the series it draws and how."""

    title: str
    keys: list[str]
    smooth: bool = False  # raw + running mean (the training loss)
    zero_line: bool = False


def plan_panels(runs: list[RunMetrics]) -> list[Panel]:
    """The panels the runs' series fill, in reading order: loss, grounding, other training figures, learning rates
    and other figures, validation metrics. Left out: test metrics (one point each), skip counters that stayed 0 and
    a loss's only component (the loss itself)."""
    present = {k for run in runs for k in run.series}
    panels: list[Panel] = []
    if LOSS in present:
        panels.append(Panel(TITLES[LOSS], [LOSS], smooth=True))
    gaps = [k for k in GAPS if k in present]
    if gaps:
        panels.append(Panel(TITLES[GAPS[0]], gaps, zero_line=True))
    panels += [Panel(TITLES[k], [k]) for k in PROMPT if k in present]
    taken = {LOSS, *GAPS, *PROMPT}
    ordered = sorted(present - taken, key=lambda k: (_group_rank(k), k))
    breakdowns: dict[str, list[str]] = {}
    for key in ordered:
        if key.startswith("test/") or _idle_counter(key, runs) or _same_as_loss(key, runs):
            continue
        if "=" in key:  # val/answer_type=yes/no: one panel per breakdown
            breakdowns.setdefault(key.split("=", 1)[0], []).append(key)
            continue
        panels.append(Panel(key, [key]))
    for prefix, keys in breakdowns.items():
        if len(keys) <= MAX_BREAKDOWN:
            panels.append(Panel(f"{prefix} (by type)", keys))
        else:
            log.info("curves: %d %s=... series left out of the figure (more than %d)", len(keys), prefix, MAX_BREAKDOWN)
    return panels


def _group_rank(key: str) -> int:
    return 0 if key.startswith("train/") else 2 if key.startswith("val/") else 1


def _idle_counter(key: str, runs: list[RunMetrics]) -> bool:
    """A skip counter (``val/skipped``, ``train/nonfinite_skipped``) that stayed 0 in every run: a flat line."""
    return key.endswith("skipped") and all(v == 0 for run in runs for v in run.series.get(key, ([], []))[1])


def _same_as_loss(key: str, runs: list[RunMetrics]) -> bool:
    """A training loss's only component (``train/lm_loss`` of a one-loss model): the loss panel shows it already."""
    return key.startswith("train/") and all(run.series.get(key) == run.series.get(LOSS) for run in runs)


def figure_size(panels: int) -> tuple[int, int]:
    """The PNG's width and height in pixels for ``panels`` panels."""
    columns = min(MAX_COLUMNS, max(panels, 1))
    rows = max(1, math.ceil(panels / columns))
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def running_mean(values: list[float], window: int) -> list[float]:
    """The trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """A light smoothing: about a twentieth of the points, at least 1."""
    return max(1, n // 20)


def draw_curves(runs: list[RunMetrics], out: str | Path) -> Path:
    """Draw the runs' curves into the PNG ``out`` (written whole or not at all) and return its path.

    Drawn on a bare matplotlib ``Figure`` with the Agg canvas: no display, no pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = plan_panels(runs)
    if not panels:
        where = ", ".join(str(r.path) for r in runs)
        raise ConfigError(f"{where}: no training or validation metrics to draw (a test run's log holds only test/*)")
    width, height = figure_size(len(panels))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    columns = min(MAX_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    several = len(runs) > 1
    for ax, panel in zip(axes, panels, strict=False):
        for r, run in enumerate(runs):
            for k, key in enumerate(panel.keys):
                if key in run.series:
                    # One run: a colour per series. Several: a colour per run, a line style per series.
                    color, style = (f"C{r % 10}", LINE_STYLES[k % len(LINE_STYLES)]) if several else (f"C{k % 10}", "-")
                    label = _label(run.name if several else "", key if len(panel.keys) > 1 else "")
                    _plot(ax, *run.series[key], color, style, label, panel.smooth, several)
        if panel.zero_line:
            ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(_ylabel(panel))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if several:
        fig.suptitle("runs: " + ", ".join(r.name for r in runs), fontsize=11)
    return _save(fig, Path(out))


def _plot(
    ax: Any, steps: list[int], values: list[float], color: str, style: str, label: str, smooth: bool, several: bool
) -> None:
    """One series: for the loss raw and faint plus its running mean (when it has points enough to smooth), else a
    line (with markers when sparse)."""
    window = smoothing_window(len(values))
    if smooth and window > 1:
        ax.plot(steps, values, style, color=color, alpha=0.3, linewidth=0.8, label=None if several else "raw")
        mean = label or f"running mean ({window} points)"
        ax.plot(steps, running_mean(values, window), style, color=color, linewidth=1.6, label=mean)
    else:
        marker = "o" if len(values) <= 30 else None
        ax.plot(steps, values, style, color=color, marker=marker, markersize=3, linewidth=1.2, label=label or None)


def _label(run: str, key: str) -> str:
    short = re.sub(r"^(train|val)/", "", key)
    return ": ".join(part for part in (run, short) if part)


def _ylabel(panel: Panel) -> str:
    if panel.smooth:
        return "loss"
    if len(panel.keys) > 1:
        return panel.keys[0].split("/", 1)[-1].split("=", 1)[0]
    return panel.keys[0].split("/", 1)[-1]


def _save(fig: object, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        fig.savefig(partial, format="png")  # type: ignore[attr-defined]
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
