"""Does the video model see motion? Temporal modules compared on the moving-shapes world's held-out clips.

    python bench/video_motion.py [--steps 400] [--seeds 0] [--workdir runs/bench-video]
                                 [--variants middle mean paper ordered]

Each variant is ``configs/tiny/video_evlgen.yaml`` with another temporal module, trained and tested through the
``vlgen`` command with the same steps and seed:

- ``middle``: the image model on the clip's middle frame only (sees no motion at all);
- ``mean``: every frame through the image model, tokens averaged over frames, nothing temporal trained;
- ``paper``: EVLGen's contextualizer as the paper has it (no frame positions: blind to frame order);
- ``ordered``: the contextualizer with a learned frame embedding on queries and keys (the config's setting);
- ``concat``: every frame's tokens side by side with a learned frame embedding (4x the tokens into the connector).

Prints, for the 128 test clips: CIDEr-D (x100) and BLEU-4 against the world's captions (all of which describe
motion), and two motion scores checked against the world's recorded facts: clips right, the share of clips whose
generated caption names every object's colour, shape and motion (direction, still, appears, disappears) correctly,
and objects right, the share of all objects the captions name with their motion correctly.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cli_runs import REPO, TINY, latest_run, overlay, vlgen, workdir

from vlgen.data.synthetic.motion import caption_states_motion, objects_with_motion_stated

CONTEXT = {"hidden_dim": 64, "num_heads": 8, "max_frames": 4}  # as configs/tiny/video_evlgen.yaml
TEMPORAL = {
    "middle": {"class_path": "vlgen.encoders.MiddleFrame"},
    "mean": {"class_path": "vlgen.encoders.MeanOverTime"},
    "paper": {
        "class_path": "vlgen.encoders.TemporalContextualizer",
        "init_args": {**CONTEXT, "frame_embedding": False},
    },
    "ordered": {
        "class_path": "vlgen.encoders.TemporalContextualizer",
        "init_args": {**CONTEXT, "frame_embedding": True},
    },
    "concat": {"class_path": "vlgen.encoders.ConcatFrames", "init_args": {"max_frames": 4}},
}


def temporal(work: Path, name: str) -> list[str]:
    """Overlays that swap the config's temporal module for ``name``'s (cleared first: init_args do not carry over)."""

    def encoder(value: dict | None) -> dict:
        return {"model": {"init_args": {"encoder": {"init_args": {"temporal": value}}}}}

    return [*overlay(work, "temporal_none", encoder(None)), *overlay(work, f"temporal_{name}", encoder(TEMPORAL[name]))]


def motion_scores(run: Path, test_file: Path) -> tuple[float, float]:
    """(share of clips whose caption states every object and its motion, share of objects stated with their
    motion) over the test predictions of ``run``."""
    facts = {r["video_id"]: r["facts"] for r in json.loads(test_file.read_text())}
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines() if line.strip()]
    clips = sum(caption_states_motion(r["caption"], facts[r["id"]]) for r in rows) / len(rows)
    per_object = [objects_with_motion_stated(r["caption"], facts[r["id"]]) for r in rows]
    return clips, sum(r for r, _ in per_object) / sum(n for _, n in per_object)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(TEMPORAL), default=list(TEMPORAL))
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-video")
    args = parser.parse_args()
    work = workdir(args.workdir)
    base = ["--config", str(TINY / "video_evlgen.yaml"), "--trainer.enable_progress_bar", "false"]
    base += ["--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0"]
    results: dict[str, list[tuple[float, float, float]]] = {}
    for name in args.variants:
        swap = temporal(work, name)
        for seed in args.seeds:
            run_args = [*base, *swap, "--seed_everything", str(seed)]
            seconds = vlgen(["fit", *run_args], work)
            ckpt = latest_run(work) / "checkpoints" / "last.ckpt"
            vlgen(["test", *run_args, "--ckpt_path", str(ckpt)], work)
            run = latest_run(work)
            scores = json.loads((run / "metrics.json").read_text())
            acc, objects = motion_scores(run, work / "data" / "shapes-video" / "test.json")
            row = (100 * scores["CIDEr"], 100 * scores["Bleu_4"], 100 * acc, 100 * objects)
            results.setdefault(name, []).append(row)
            print(
                f"{name:8s} seed {seed}: CIDEr-D {row[0]:6.1f}  BLEU-4 {row[1]:5.1f}  clips right {row[2]:5.1f}%  "
                f"objects right {row[3]:5.1f}%  (fit {seconds:.0f} s)",
                flush=True,
            )
    print(f"\n{args.steps} steps, seeds {args.seeds}; mean (sd over seeds)")
    print(f"{'temporal module':16s} {'CIDEr-D':>14s} {'BLEU-4':>14s} {'clips right %':>14s} {'objects right %':>15s}")
    for name, rows in results.items():
        cells = []
        for column in zip(*rows):
            sd = statistics.stdev(column) if len(column) > 1 else 0.0
            cells.append(f"{statistics.mean(column):7.1f} ± {sd:4.1f}")
        print(f"{name:16s} {cells[0]:>14s} {cells[1]:>14s} {cells[2]:>14s} {cells[3]:>15s}")


if __name__ == "__main__":
    main()
