"""What a finished test run scored, as a person reads it: ``vlgen report RUN_DIR [--world ROOT]``.

``vlgen test`` writes ``metrics.json`` and ``predictions.jsonl`` into its log directory; the report prints the
metrics (CIDEr-D also on the papers' x100 scale; for a VQA run its accuracy, per answer type, and a few questions
with the answer given and the annotators' answers), a few images' generated and reference captions, and - for a run
on a synthetic world - the **fact accuracy**: the share of test images (or clips) whose caption states every fact
of the world's own ground truth, checked by the world's checker (colour, shape, size and relations for the shapes
world; motion too for the moving-shapes world). CIDEr on a small-vocabulary world flatters; the facts do not.

A fit run's directory (no ``predictions.jsonl``; the CSV logs of ``vlgen fit``) gets a training summary instead: its
steps, last and lowest loss, last grounding gap and each validation metric's best and its step. ``--curves`` draws
the training curves from the CSV logs into ``curves.png`` (:mod:`vlgen.curves`; no W&B needed): of a fit run, of a
test run's training run (the one its ``--ckpt_path`` came from), or of several runs in one figure. A run directory
holding ``gallery.html`` gets its path printed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlgen.curves import (
    METRICS_FILE,
    RunMetrics,
    draw_curves,
    find_metrics,
    read_metrics,
    read_runs,
    render_summary,
)
from vlgen.data.synthetic import caption_states_facts, caption_states_motion
from vlgen.errors import ConfigError

CHECKERS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "shapes": caption_states_facts,
    "moving_shapes": caption_states_motion,
}
METRICS = ("CIDEr", "Bleu_4", "Bleu_1", "METEOR", "ROUGE_L")
CURVES_FILE = "curves.png"
GALLERY_FILE = "gallery.html"


@dataclass
class FactScore:
    """How many captions state their image's facts, and which."""

    right: dict[str, bool] = field(default_factory=dict)  # id -> whether its caption states the facts

    @property
    def correct(self) -> int:
        return sum(self.right.values())

    @property
    def total(self) -> int:
        return len(self.right)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def read_predictions(run_dir: str | Path) -> list[dict[str, Any]]:
    """``predictions.jsonl`` of a test or predict run: ``{"id", "caption"[, "references"]}`` per line."""
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (run `vlgen test` first; it prints its log directory)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fact_accuracy(predictions: list[dict[str, Any]], world_root: str | Path, split: str = "test") -> FactScore:
    """Check every prediction against the ground truth the synthetic world at ``world_root`` recorded for it."""
    root = Path(world_root)
    try:
        kind = json.loads((root / "world.json").read_text()).get("kind", "shapes")
        records = json.loads((root / f"{split}.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--world: {root} is not a synthetic world ({err})") from None
    if kind not in CHECKERS:
        raise ConfigError(f"--world: no fact checker for a {kind} world (known: {', '.join(CHECKERS)})")
    check = CHECKERS[kind]
    facts = {r.get("image_id", r.get("video_id")): r["facts"] for r in records}
    unknown = [p["id"] for p in predictions if p["id"] not in facts]
    if unknown:
        where = root / f"{split}.json"
        raise ConfigError(f"--world: {len(unknown)} predicted ids are not in {where}, e.g. {unknown[0]}")
    right = {p["id"]: check(p["caption"], facts[p["id"]]) for p in predictions}
    return FactScore(right)


def render_report(run_dir: str | Path, world_root: str | Path | None = None, samples: int = 6) -> str:
    """The report's text: metrics, fact accuracy (with a world) and ``samples`` generated vs reference captions."""
    run = Path(run_dir)
    predictions = read_predictions(run)
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if "accuracy" in metrics or (predictions and "prompt" in predictions[0] and "CIDEr" not in metrics):
        return _vqa_report(run, predictions, metrics, samples)
    lines = [f"run: {run}  ({len(predictions)} captions)"]
    if metrics:
        if "CIDEr" in metrics:
            lines.append(f"  CIDEr-D  {metrics['CIDEr']:.3f}  ({100 * metrics['CIDEr']:.1f} on the papers' x100 scale)")
        lines += [f"  {name:<8} {metrics[name]:.3f}" for name in METRICS[1:] if name in metrics]
    facts = fact_accuracy(predictions, world_root) if world_root is not None else None
    if facts is not None:
        lines.append(
            f"  fact accuracy  {100 * facts.accuracy:.1f}%  ({facts.correct} of {facts.total} captions state every "
            "object and relation of the world's ground truth)"
        )
    for p in predictions[:samples]:
        verdict = "" if facts is None else ("  [facts right]" if facts.right[p["id"]] else "  [facts wrong]")
        lines.append(f"  {p['id']}{verdict}")
        lines.append(f"    generated: {p['caption']}")
        if p.get("references"):
            lines.append(f"    reference: {p['references'][0]}")
    return "\n".join(lines + gallery_lines(run))


def _vqa_report(run: Path, predictions: list[dict[str, Any]], metrics: dict[str, float], samples: int) -> str:
    lines = [f"run: {run}  ({len(predictions)} questions)"]
    if "accuracy" in metrics:
        lines.append(f"  VQA accuracy  {metrics['accuracy']:.2f}%  (official evaluation, unrounded in metrics.json)")
        by_type = {k.split("=", 1)[1]: v for k, v in metrics.items() if k.startswith("answer_type=")}
        lines += [f"    {name:<10} {value:.2f}%" for name, value in by_type.items()]
    else:
        lines.append("  no accuracy: the split has no answers (the submission file holds the predictions)")
    for p in predictions[:samples]:
        lines.append(f"  {p['id']}  {p.get('prompt', '')}")
        lines.append(f"    answer:     {p['caption']}")
        if p.get("references"):
            counts = Counter(p["references"])
            lines.append("    annotators: " + ", ".join(f"{a} x{n}" if n > 1 else a for a, n in counts.most_common()))
    return "\n".join(lines + gallery_lines(run))


def gallery_lines(run: Path) -> list[str]:
    """``gallery: PATH`` when the run directory holds the HTML gallery ``vlgen test`` writes."""
    gallery = run / GALLERY_FILE
    return [f"  gallery: {gallery}"] if gallery.is_file() else []


def training_log(run: Path) -> tuple[Path, bool]:
    """The ``metrics.csv`` with a test run's training curves, and whether it is another run's: the test run's own
    when it holds any training or validation figure, else the one beside the checkpoint its ``config.yaml`` names
    (``ckpt_path``, read as given and relative to the run directory's parents, as it was relative to the working
    directory of ``vlgen test``)."""
    own = run / METRICS_FILE
    if own.is_file() and any(not k.startswith("test/") for k in read_metrics(own).series):
        return own, False
    ckpt = _ckpt_path(run)
    if ckpt is not None:
        for base in (Path(), *run.resolve().parents):
            found = base / ckpt
            for folder in (found.parent, found.parent.parent):  # beside it, or above its checkpoints/ directory
                if (folder / METRICS_FILE).is_file() and not (folder / "predictions.jsonl").is_file():
                    return folder / METRICS_FILE, True
    named = f"the checkpoint it tested ({ckpt})" if ckpt else "no --ckpt_path in its config.yaml"
    raise ConfigError(
        f"--curves: {run} is a test run without training curves and no {METRICS_FILE} of its training run was found "
        f"({named}): give the fit run's directory instead"
    )


def _ckpt_path(run: Path) -> Path | None:
    import yaml

    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    ckpt = config.get("ckpt_path") if isinstance(config, dict) else None
    return Path(ckpt) if isinstance(ckpt, str) and "://" not in ckpt else None


def curves_path(curves: str | bool, run_dirs: list[str | Path]) -> Path:
    """Where ``--curves`` draws: ``curves.png`` in the first run directory given, or the ``.png`` it names."""
    if curves is True or curves == "":
        return Path(run_dirs[0]) / CURVES_FILE
    out = Path(str(curves))
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--curves {curves}: the figure is a PNG, give a path ending in .png (or no value)")
    return out


def report_runs(
    run_dirs: list[str | Path],
    world_root: str | Path | None = None,
    samples: int = 6,
    curves: str | bool = False,
    all_versions: bool = False,
) -> str:
    """The report of ``vlgen report``: for each run directory the test report (a test run) or a training summary
    (a fit run, or a parent of ``version_*`` runs); with ``curves`` (True, or the PNG to write) the training curves
    of all of them drawn into one figure, whose path ends the report."""
    out = curves_path(curves, run_dirs) if curves is not False else None  # a bad path stops before any reading
    blocks: list[tuple[str | None, list[Path]]] = []  # (a test run's report, the run's training logs)
    borrowed: set[Path] = set()  # training logs found for a test run, beside its checkpoint
    for given in run_dirs:
        run = Path(given)
        if (run / "predictions.jsonl").is_file():
            logs: list[Path] = []
            if curves is not False:
                log_file, foreign = training_log(run)
                logs = [log_file]
                if foreign:
                    borrowed.add(log_file)
            blocks.append((render_report(run, world_root, samples), logs))
            continue
        try:
            logs = find_metrics(run, all_versions)
        except ConfigError:
            if curves is False:
                read_predictions(run)  # neither a test nor a fit run: the test report's own error
            raise
        blocks.append((None, logs))
    files = list(dict.fromkeys(f for _, logs in blocks for f in logs))
    runs: dict[Path, RunMetrics] = dict(zip(files, read_runs(files), strict=True))
    lines: list[str] = []
    for text, logs in blocks:
        if text is not None:
            lines.append(text)
            lines += [f"  training log: {f}  (the run its checkpoint came from)" for f in logs if f in borrowed]
            continue
        for f in logs:
            lines.append(f"run: {f.parent}  (a fit run: no predictions.jsonl)")
            lines.append(render_summary(runs[f]))
            lines += gallery_lines(f.parent)
    if out is not None:
        lines.append(f"curves: {draw_curves(list(runs.values()), out)}")
    elif any(text is None for text, _ in blocks):
        lines.append("(--curves draws the training curves into curves.png)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """``vlgen report RUN_DIR [RUN_DIR ...] [--world ROOT] [--samples N] [--curves [OUT.png]] [--all-versions]``:
    print what a test run scored, or a fit run's training summary; ``--curves`` draws the training curves."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlgen report", description=main.__doc__, exit_on_error=False)
    parser.add_argument(
        "run_dir",
        nargs="*",  # one at least: checked below, after `--curves RUN_DIR` is read as the flag before the directory
        help="a test run's log directory (holds metrics.json and predictions.jsonl), a fit run's (holds metrics.csv) "
        "or a parent of version_* runs (its latest fit run); several: one report each, one figure for all",
    )
    parser.add_argument("--world", default=None, help="the synthetic world the run was tested on: adds fact accuracy")
    parser.add_argument("--samples", type=int, default=6, help="images whose captions are printed")
    parser.add_argument(
        "--curves",
        nargs="?",
        const=True,
        default=False,
        metavar="OUT.png",
        help="draw the training curves from the runs' metrics.csv into OUT.png (default: curves.png in the first "
        "RUN_DIR); a test run's come from the run its checkpoint was trained in",
    )
    parser.add_argument(
        "--all-versions", action="store_true", help="for a parent of version_* runs: every fit run, not the latest"
    )
    args = parser.parse_args(argv)
    if not args.run_dir and isinstance(args.curves, str) and not args.curves.lower().endswith(".png"):
        args.run_dir, args.curves = [args.curves], True
    if not args.run_dir:
        raise ConfigError("vlgen report: give the run directory to report on (RUN_DIR)")
    print(report_runs(args.run_dir, args.world, args.samples, args.curves, args.all_versions))
