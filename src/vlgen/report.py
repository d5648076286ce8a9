"""What a finished test run scored, as a person reads it: ``vlgen report RUN_DIR [--world ROOT]``.

``vlgen test`` writes ``metrics.json`` and ``predictions.jsonl`` into its log directory; the report prints the
metrics (CIDEr-D also on the papers' x100 scale; for a VQA run its accuracy, per answer type, and a few questions
with the answer given and the annotators' answers), a few images' generated and reference captions, and - for a run
on a synthetic world - the **fact accuracy**: the share of test images (or clips) whose caption states every fact
of the world's own ground truth, checked by the world's checker (colour, shape, size and relations for the shapes
world; motion too for the moving-shapes world). CIDEr on a small-vocabulary world flatters; the facts do not.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlgen.data.synthetic import caption_states_facts, caption_states_motion
from vlgen.errors import ConfigError

CHECKERS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "shapes": caption_states_facts,
    "moving_shapes": caption_states_motion,
}
METRICS = ("CIDEr", "Bleu_4", "Bleu_1", "METEOR", "ROUGE_L")


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
    return "\n".join(lines)


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
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """``vlgen report RUN_DIR [--world ROOT] [--samples N]``: print what a test run scored."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlgen report", description=main.__doc__, exit_on_error=False)
    parser.add_argument("run_dir", help="a test run's log directory (holds metrics.json and predictions.jsonl)")
    parser.add_argument("--world", default=None, help="the synthetic world the run was tested on: adds fact accuracy")
    parser.add_argument("--samples", type=int, default=6, help="images whose captions are printed")
    args = parser.parse_args(argv)
    print(render_report(args.run_dir, args.world, args.samples))
