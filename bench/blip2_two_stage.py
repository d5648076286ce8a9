"""Does BLIP-2's stage 1 pay off? Stage 1 then stage 2 vs stage 2 alone, same stage-2 steps, held-out CIDEr-D.

    python bench/blip2_two_stage.py [--stage1-steps 300] [--stage2-steps 300] [--seeds 0] [--workdir runs/bench-blip2]

Runs the tiny BLIP-2 configs through the ``vlgen`` command on the synthetic shapes world (frozen tiny encoder
and tiny world LM pre-trained on the world, Q-Former from all-MiniLM-L6-v2): (a) ``configs/tiny/blip2_stage1.yaml``
then ``configs/tiny/blip2_stage2.yaml`` from its checkpoint; (b) the same stage 2 with ``init_from: null`` (the Q-Former
starts from MiniLM). Both are tested on the world's test split; prints CIDEr-D and BLEU-4 (x100, as papers print
them), the stage-1 retrieval recall, and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from cli_runs import REPO, TINY, last_logged, latest_run, vlgen, workdir

STAGE1 = TINY / "blip2_stage1.yaml"
STAGE2 = TINY / "blip2_stage2.yaml"


def stage2_and_test(cwd: Path, seed: int, steps: int, init_from: str | None) -> dict[str, float]:
    # init_from goes through a YAML overlay: on the command line jsonargparse reads a nested `null` as "None"
    overlay = cwd / f"init_from_{'none' if init_from is None else 'stage1'}.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"bridge": {"init_args": {"init_from": init_from}}}}}))
    args = ["--config", str(STAGE2), "--config", str(overlay), "--seed_everything", str(seed)]
    args += ["--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false"]
    fit_time = vlgen(["fit", *args], cwd)
    ckpt = latest_run(cwd) / "checkpoints" / "last.ckpt"
    vlgen(["test", *args, "--ckpt_path", str(ckpt)], cwd)
    scores = json.loads((latest_run(cwd) / "metrics.json").read_text())
    refs = [json.loads(line)["references"] for line in open(latest_run(cwd) / "predictions.jsonl")]
    return {"CIDEr": 100 * scores["CIDEr"], "Bleu_4": 100 * scores["Bleu_4"], "fit_s": fit_time, "refs": refs}


def best_constant_cider(refs: list[list[str]]) -> float:
    """CIDEr-D (x100) of the best single caption said for every image (tried: every image's first reference)."""
    from vlgen.metrics import CaptionMetrics

    best = 0.0
    for candidate in sorted({r[0] for r in refs}):
        metric = CaptionMetrics(use_java=False)  # CIDEr only; the Python PTB tokenizer matches Java's on these
        metric.update([candidate] * len(refs), refs)
        best = max(best, 100 * metric.compute()["CIDEr"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-blip2")
    args = parser.parse_args()
    work = workdir(args.workdir)
    results: dict[str, list[dict[str, float]]] = {"stage 1 + stage 2": [], "stage 2 alone": []}
    for seed in args.seeds:
        common = ["--seed_everything", str(seed), "--trainer.enable_progress_bar", "false"]
        s1_time = vlgen(["fit", "--config", str(STAGE1), "--trainer.max_steps", str(args.stage1_steps), *common], work)
        recall = last_logged(latest_run(work), "val/r_mean")
        two = stage2_and_test(work, seed, args.stage2_steps, "runs/tiny-blip2-stage1/last.ckpt")
        two.update(stage1_s=s1_time, stage1_recall=recall or float("nan"))
        results["stage 1 + stage 2"].append(two)
        results["stage 2 alone"].append(stage2_and_test(work, seed, args.stage2_steps, None))
        shown = {k: {m: round(x, 2) for m, x in v[-1].items() if m != "refs"} for k, v in results.items()}
        print(f"seed {seed}: {json.dumps(shown)}", flush=True)

    print(f"\nstage-1 steps {args.stage1_steps}, stage-2 steps {args.stage2_steps}, seeds {args.seeds}")
    print(f"{'':20s} {'CIDEr-D':>16s} {'BLEU-4':>16s} {'stage-2 fit s':>14s}")
    for name, rows in results.items():
        cells = []
        for key in ("CIDEr", "Bleu_4"):
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):7.1f} +- {sd:5.1f}")
        print(f"{name:20s} {cells[0]:>16s} {cells[1]:>16s} {statistics.mean(r['fit_s'] for r in rows):14.0f}")
    constant = best_constant_cider(results["stage 2 alone"][0]["refs"])
    print(f"{'best constant caption':20s} {constant:7.1f}  (a model that ignores the image)")
    s1 = results["stage 1 + stage 2"]
    print(
        f"stage 1: {statistics.mean(r['stage1_s'] for r in s1):.0f} s, val recall mean "
        f"{statistics.mean(r['stage1_recall'] for r in s1):.1f}%"
    )


if __name__ == "__main__":
    main()
