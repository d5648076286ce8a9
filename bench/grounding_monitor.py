"""Does the grounding monitor tell a model that reads its image from one that does not, and what does it cost?

Fits ``configs/tiny/linear.yaml`` (the monitor every 20 steps) as it is, and again with the bridge's learning rate
at 1e-12 (a bridge that learns nothing: its prompts stay random projections of the image), each ``--seeds`` times;
prints ``train/grounding_gap`` over the steps from each run's CSV log, and the monitor's share of training time
(the line the monitor logs at the end of a fit):

    python bench/grounding_monitor.py [--seeds 0 1 2] [--steps 400] [--config configs/tiny/linear.yaml]
    python bench/grounding_monitor.py --config configs/demo/shapes_smollm2.yaml --steps 300 --seeds 0 --isolated

Each tiny fit takes one to three minutes on 2 CPU cores once the tiny world, encoder and LM exist (the first builds
them). ``--isolated`` replaces the config's loggers, callbacks and validation by a CSV logger in a temporary
directory, the monitor alone (``--every`` steps, warm-up 100) and no checkpoints or validation: for configs such as
the demo's, whose loggers and checkpoints write to fixed paths a real run uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fit(config: str, seed: int, steps: int, root: Path, extra: list[str]) -> tuple[dict[int, float], float]:
    """One fit; its ``train/grounding_gap`` by step and the monitor's share of training time (percent)."""
    cmd = [sys.executable, "-m", "vlgen.cli", "fit", "--config", config, "--seed_everything", str(seed),
           "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
           "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"fit failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    share = re.search(r"grounding monitor: \d+ checks, [\d.]+ s, ([\d.]+)% of the training time", proc.stderr)
    gaps = {}
    for path in root.rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/grounding_gap"):
                    gaps[int(row["step"])] = float(row["train/grounding_gap"])
    return gaps, float(share.group(1)) if share else float("nan")


def isolating_overlay(root: Path, every: int) -> list[str]:
    """A config file of its own for one fit: only a CSV logger under ``root`` and the monitor."""
    monitor = {"class_path": "vlgen.callbacks.GroundingMonitor", "init_args": {"every_n_steps": every,
                                                                                "warmup_steps": 100}}  # fmt: skip
    trainer = {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
               "callbacks": [monitor], "enable_checkpointing": False, "limit_val_batches": 0}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps({"trainer": trainer}))  # JSON is YAML
    return ["--config", str(root / "bench.json")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny/linear.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=["trained", "broken"],
        default=["trained", "broken"],
        help="which of the two fits to run (broken: the bridge at lr 1e-12)",
    )
    parser.add_argument("--isolated", action="store_true", help="own logger and callbacks (see above)")
    parser.add_argument("--every", type=int, default=20, help="with --isolated: steps between two measurements")
    args = parser.parse_args()
    variants = {"trained": ("trained", []), "broken": ("bridge lr 1e-12", ["--model.init_args.optim.lr", "1e-12"])}
    runs: dict[str, list] = {variants[key][0]: [] for key in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, extra in (variants[key] for key in args.runs):
                root = Path(tmp) / f"{name.split()[0]}-{seed}"
                own = isolating_overlay(root, args.every) if args.isolated else []
                runs[name].append(fit(args.config, seed, args.steps, root, [*extra, *own]))
                print(f"seed {seed} {name}: done", file=sys.stderr)
    steps = sorted(set.intersection(*(set(g) for rs in runs.values() for g, _ in rs)))
    print("train/grounding_gap (nats per target token), mean [min, max] over seeds", args.seeds)
    print(f"{'step':>6} | " + " | ".join(f"{name:>26}" for name in runs))
    for step in steps:
        cells = []
        for rs in runs.values():
            xs = [g[step] for g, _ in rs]
            cells.append(f"{statistics.mean(xs):8.4f} [{min(xs):7.4f}, {max(xs):7.4f}]")
        print(f"{step:>6} | " + " | ".join(cells))
    for name, rs in runs.items():
        shares = [s for _, s in rs]
        print(f"monitor share of training time, {name}: {statistics.mean(shares):.1f}% "
              f"[{min(shares):.1f}, {max(shares):.1f}]")  # fmt: skip


if __name__ == "__main__":
    main()
