"""P-Former's claim at small scale: with few image-text pairs and a larger text-only corpus, does prompt alignment
help the same bridge? Held-out CIDEr-D with and without alignment over several seeds.

    python bench/pformer_alignment.py [--stage0-steps 600] [--steps 300] [--pairs 100] [--seeds 0 1 2]
                                      [--workdir runs/bench-pformer]

(1) Stage 0 on text alone: ``configs/tiny/pformer_stage0.yaml`` on the world's 20,000-sentence corpus; exact-match
reconstruction of held-out captions (greedy decoding by the frozen tiny LM from the P-Former's prompts alone) is
measured before training (``vlgen validate``) and after. (2) For each seed, the tiny linear captioner of
``configs/tiny/pformer_align.yaml`` trained on only ``--pairs`` images (5 captions each) of a world that shares the
corpus, encoder, LM and test split, once with the alignment loss and once without (``objectives: []``), same
steps; both tested on the 128 test images. Prints CIDEr-D (x100) per seed, then mean +- sd.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cli_runs import REPO, TINY, last_logged, latest_run, overlay, vlgen, workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage0-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=100, help="training images (5 captions each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-pformer")
    args = parser.parse_args()
    work = workdir(args.workdir)
    quiet = ["--trainer.enable_progress_bar", "false"]

    stage0 = ["--config", str(TINY / "pformer_stage0.yaml"), *quiet]
    stage0 += overlay(work, "stage0_val", {"trainer": {"limit_val_batches": 2}})
    vlgen(["validate", *stage0], work)
    before = last_logged(latest_run(work), "val/exact_match")
    full = {"trainer": {"max_steps": args.stage0_steps, "val_check_interval": args.stage0_steps}}
    vlgen(["fit", *stage0, *overlay(work, "stage0_steps", full)], work)
    run = latest_run(work)
    after, lm = last_logged(run, "val/exact_match"), last_logged(run, "val/lm")
    print(f"stage 0: {args.stage0_steps} steps; held-out exact match {100 * before:.1f}% -> {100 * after:.1f}%, "
          f"val LM loss {lm:.3f}", flush=True)  # fmt: skip

    world = {"seed": 0, "num_train": args.pairs, "num_val": 64, "num_test": 128, "num_text": 20000}
    few = {
        "root": "data/shapes-few",
        "generate": {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": world},
    }
    common = [
        "--config", str(TINY / "pformer_align.yaml"), *quiet, "--trainer.max_steps", str(args.steps),
        *overlay(work, "few_pairs", {"data": {"init_args": few}, "trainer": {"limit_val_batches": 0}}),
    ]  # fmt: skip
    no_align = overlay(work, "no_alignment", {"model": {"init_args": {"objectives": []}}})
    scores: dict[str, list[float]] = {"with alignment": [], "without": []}
    for seed in args.seeds:
        for name, extra in (("with alignment", []), ("without", no_align)):
            run_args = [*common, *extra, "--seed_everything", str(seed)]
            vlgen(["fit", *run_args], work)
            ckpt = latest_run(work) / "checkpoints" / "last.ckpt"
            vlgen(["test", *run_args, "--ckpt_path", str(ckpt)], work)
            scores[name].append(100 * json.loads((latest_run(work) / "metrics.json").read_text())["CIDEr"])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in scores.items()), flush=True)

    print(f"\n{args.pairs} image-text pairs (x5 captions), {args.steps} steps, seeds {args.seeds}; held-out CIDEr-D")
    for name, values in scores.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:16s} {statistics.mean(values):6.1f} +- {sd:4.1f}   ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
