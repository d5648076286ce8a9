"""Time to quality: EVLGen one-stage vs BLIP-2 two-stage (and BLIP-2 stage 2 alone) on the synthetic world.

    python bench/evlgen_vs_blip2.py [--steps 400] [--stage1-steps 300] [--every 50] [--seed 0]
                                    [--workdir runs/bench-evlgen]

Side by side in one run, through the ``vlgen`` command, on the same frozen tiny encoder (read at feature_stage 3:
16 tokens) and frozen tiny world LM: (a) ``configs/tiny/evlgen.yaml``; (b) ``configs/tiny/blip2_stage1.yaml`` then
``configs/tiny/blip2_stage2.yaml`` from its checkpoint; (c) that stage 2 from MiniLM, without stage 1. Training
time is Lightning's ``Timer`` (fit loop only: no model building, no evaluation, which is switched off during
training); a checkpoint every ``--every`` steps is tested afterwards on the world's test split. Prints held-out
CIDEr-D (x100) against training seconds for each, then: the time each takes to reach BLIP-2 two-stage's final
CIDEr-D (stage 1 counted), and the CIDEr-D of each at EVLGen's total training time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cli_runs import REPO, TINY, latest_run, overlay, vlgen, workdir

ENCODER = {"model": {"init_args": {"encoder": {"init_args": {"feature_stage": 3}}}}}


def train_seconds(ckpt: Path) -> float:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    timer = next(v for k, v in state["callbacks"].items() if k.startswith("Timer"))
    return float(timer["time_elapsed"]["train"])


def callbacks(every: int, dirpath: Path | None, extra: list[dict]) -> dict:
    checkpoint = {"save_last": True, "save_top_k": -1, "every_n_train_steps": every, "filename": "{step}"}
    if dirpath is not None:
        checkpoint["dirpath"] = str(dirpath)
    return {
        "trainer": {
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
                {
                    "class_path": "lightning.pytorch.callbacks.Timer",
                    "init_args": {"interval": "step"},
                },  # a str, not the enum default, or the config will not dump
                *extra,
            ],
        }
    }


def curve(work: Path, configs: list[str], steps: int, every: int, seed: int, offset: float) -> list[tuple]:
    """Fit, then test each checkpoint: ``[(step, train seconds + offset, CIDEr x100)]``."""
    args = [*configs, "--seed_everything", str(seed), "--trainer.max_steps", str(steps)]
    vlgen(["fit", *args], work)
    run = latest_run(work)
    points = []
    for ckpt in sorted((run / "checkpoints").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1])):
        vlgen(["test", *args, "--ckpt_path", str(ckpt)], work)
        cider = 100 * json.loads((latest_run(work) / "metrics.json").read_text())["CIDEr"]
        points.append((int(ckpt.stem.split("=")[1]), offset + train_seconds(ckpt), cider))
        print(f"  step {points[-1][0]:4d}  {points[-1][1]:7.1f} s  CIDEr-D {cider:6.1f}", flush=True)
    return points


def first_reaching(points: list[tuple], target: float) -> float | None:
    return next((t for _, t, c in points if c >= target), None)


def at_time(points: list[tuple], seconds: float) -> float | None:
    """CIDEr-D of the last checkpoint saved by ``seconds`` of training (None before the first)."""
    done = [c for _, t, c in points if t <= seconds]
    return done[-1] if done else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="EVLGen and BLIP-2 stage-2 steps")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-evlgen")
    args = parser.parse_args()
    work = workdir(args.workdir)
    enc = overlay(work, "encoder", ENCODER)
    ramp = [{"class_path": "vlgen.callbacks.MergeRamp", "init_args": {"steps": 100}}]  # as configs/tiny/evlgen.yaml

    print("EVLGen, one stage:", flush=True)
    evlgen = curve(
        work, ["--config", str(TINY / "evlgen.yaml"), *overlay(work, "cb_evlgen", callbacks(args.every, None, ramp))],
        args.steps, args.every, args.seed, 0.0,
    )  # fmt: skip
    print("BLIP-2 stage 1:", flush=True)
    stage1_dir = work / "runs" / "tiny-blip2-stage1"
    s1 = ["--config", str(TINY / "blip2_stage1.yaml"), *enc]
    s1 += overlay(work, "cb_stage1", callbacks(args.stage1_steps, stage1_dir, []))
    start = time.perf_counter()
    vlgen(["fit", *s1, "--seed_everything", str(args.seed), "--trainer.max_steps", str(args.stage1_steps)], work)
    stage1_s = train_seconds(stage1_dir / "last.ckpt")
    print(f"  {args.stage1_steps} steps, {stage1_s:.1f} s training ({time.perf_counter() - start:.0f} s in all)")
    cb2 = overlay(work, "cb_stage2", callbacks(args.every, None, []))
    print("BLIP-2 stage 2 after stage 1 (times include stage 1):", flush=True)
    from_s1 = overlay(
        work,
        "from_stage1",
        {"model": {"init_args": {"bridge": {"init_args": {"init_from": str(stage1_dir / "last.ckpt")}}}}},
    )
    two = curve(
        work,
        ["--config", str(TINY / "blip2_stage2.yaml"), *enc, *cb2, *from_s1],
        args.steps,
        args.every,
        args.seed,
        stage1_s,
    )
    print("BLIP-2 stage 2 alone:", flush=True)
    alone_cfg = overlay(work, "no_stage1", {"model": {"init_args": {"bridge": {"init_args": {"init_from": None}}}}})
    alone = curve(
        work,
        ["--config", str(TINY / "blip2_stage2.yaml"), *enc, *cb2, *alone_cfg],
        args.steps,
        args.every,
        args.seed,
        0.0,
    )

    target = two[-1][2]
    total = evlgen[-1][1]
    print(f"\nseed {args.seed}; {args.steps} steps each (BLIP-2 stage 1: {args.stage1_steps} more)")
    reach_title, at_title = f"to reach {target:.1f}", f"CIDEr at {total:.0f} s"
    print(f"{'':24s} {'final CIDEr-D':>13s} {'train s':>8s} {reach_title:>16s} {at_title:>16s}")
    for name, points in (("EVLGen", evlgen), ("BLIP-2 stage 1 + 2", two), ("BLIP-2 stage 2 alone", alone)):
        reach = first_reaching(points, target)
        now = at_time(points, total)
        print(
            f"{name:24s} {points[-1][2]:13.1f} {points[-1][1]:8.1f} "
            f"{'never' if reach is None else f'{reach:.1f} s':>16s} {'-' if now is None else f'{now:.1f}':>16s}"
        )
    print(time_ratio(evlgen, two, target, "BLIP-2 two-stage's final CIDEr-D"))
    common = min(max(c for _, _, c in evlgen), max(c for _, _, c in two))
    print(time_ratio(evlgen, two, common, "the highest CIDEr-D both reach"))


def time_ratio(evlgen: list[tuple], two: list[tuple], level: float, what: str) -> str:
    """How EVLGen's time to reach ``level`` compares with BLIP-2 two-stage's (stage 1 included)."""
    reach_evl, reach_two = first_reaching(evlgen, level), first_reaching(two, level)
    if reach_evl is None or reach_two is None:
        return f"{what} ({level:.1f}): EVLGen {reach_evl} s, BLIP-2 {reach_two} s (None: not reached)"
    return (
        f"{what} ({level:.1f}): EVLGen in {reach_evl:.1f} s, BLIP-2 stage 1 + 2 in {reach_two:.1f} s: "
        f"{reach_evl / reach_two:.2f}x its time"
    )


if __name__ == "__main__":
    main()
