"""How fast the demo's captioner learns: fact accuracy against training time, for the demo config and variants.

    python bench/demo_budget.py [--steps 450] [--eval-at 150 300 450] [--seeds 0] [overrides ...]
    python bench/demo_budget.py --steps 600 --model.init_args.optim.lr 2e-3

Builds the demo (``configs/demo/shapes_smollm2.yaml``, plus ``--config`` files and command-line overrides, parsed
as ``vlgen fit`` parses them) and trains it in a plain loop (forward, backward, AdamW with the config's warmup and
cosine over ``--steps``, no Lightning trainer, no loggers or callbacks). At each ``--eval-at`` step it captions the
world's validation pictures (greedy, as the demo's test decodes) and prints the fact accuracy overall and by
object count, the training seconds so far (evaluation excluded) and seconds per step. The world is written into
its own directory with ``--num-val`` validation pictures (default 128), so the test split that ``make demo``
reports is never used to choose settings; scenes are seeded per split and index, so its training pictures are
the demo's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/demo/shapes_smollm2.yaml"


def evaluate(model, loader, root: str, counts: dict[str, int]) -> dict[str, float]:
    """Fact accuracy (percent) of greedy captions on ``loader``'s pictures: overall and by object count
    (``counts``: image id -> its number of objects), checked by the world's own fact checker."""
    from vlgen.report import fact_accuracy

    predictions = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            captions = model.caption(batch["pixels"])
            predictions += [{"id": i, "caption": c} for i, c in zip(batch["ids"], captions, strict=True)]
    model.train()
    score = fact_accuracy(predictions, root, split="val")
    by_count: dict[int, list[bool]] = {}
    for image_id, ok in score.right.items():
        by_count.setdefault(counts[image_id], []).append(ok)
    out = {"facts": 100 * score.accuracy}
    out.update({f"{n} obj": 100 * sum(oks) / len(oks) for n, oks in sorted(by_count.items())})
    out["sample"] = predictions[0]["caption"]
    return out


def run(seed: int, steps: int, eval_at: list[int], overrides: list[str], root: str, num_val: int) -> list[dict]:
    from vlgen.cli import build_cli

    world = ["--data.init_args.root", root, "--data.init_args.generate.init_args.num_val", str(num_val)]
    cli = build_cli(["--config", str(DEMO), *overrides, *world, "--seed_everything", str(seed),
                     "--model.init_args.optim.max_steps", str(steps)])  # fmt: skip
    torch.manual_seed(seed)
    model, data = cli.model, cli.datamodule
    data.prepare_data()
    data.set_transforms(model.image_transform(True), model.image_transform(False))
    data.setup("fit")
    records = json.loads((Path(root) / "val.json").read_text())
    counts = {r["image_id"]: len(r["facts"]["objects"]) for r in records}
    model.log = lambda *a, **k: None  # no trainer attached
    model.train()
    opts = model.configure_optimizers()
    opt, sched = opts["optimizer"], opts["lr_scheduler"]["scheduler"]
    rows, trained, step, recent = [], 0.0, 0, []
    while step < steps:
        for batch in data.train_dataloader():
            start = time.perf_counter()
            loss = model.training_step(batch, step)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            trained += time.perf_counter() - start
            step += 1
            recent = [*recent[-24:], loss.item()]
            if step % 25 == 0:
                mean = sum(recent) / len(recent)
                speed = trained / step
                print(f"seed {seed} step {step}: {speed:.2f} s/step, loss {mean:.3f} (last 25)", file=sys.stderr)
            if step in eval_at:
                row = {"seed": seed, "step": step, "train_s": trained, "loss": sum(recent) / len(recent)}
                row.update(evaluate(model, data.val_dataloader(), root, counts))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            if step >= steps:
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--eval-at", type=int, nargs="+", default=None, help="default: the last step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--root", default="data/demo-budget", help="where the world (with --num-val) is written")
    parser.add_argument("--num-val", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args, overrides = parser.parse_known_args()
    eval_at = sorted(set(args.eval_at or [args.steps]))
    rows = [r for seed in args.seeds for r in run(seed, args.steps, eval_at, overrides, args.root, args.num_val)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    keys = [k for k in rows[0] if k.endswith("obj")]
    print(f"overrides: {' '.join(overrides) or '(the demo config)'}; seeds {args.seeds}; mean [min, max]")
    print(f"{'step':>5} {'train s':>16} {'s/step':>6} {'loss':>6} {'facts %':>20} " + " ".join(f"{k:>7}" for k in keys))
    for step in eval_at:
        at = [r for r in rows if r["step"] == step]

        def cell(key: str, fmt: str = "5.1f", at: list[dict] = at) -> str:
            xs = [r[key] for r in at]
            return f"{statistics.mean(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"

        per_step = statistics.mean(r["train_s"] / r["step"] for r in at)
        objs = " ".join(f"{statistics.mean(r[k] for r in at):7.1f}" for k in keys)
        print(f"{step:>5} {cell('train_s', '4.0f'):>16} {per_step:6.2f} {cell('loss', '.2f')[:4]:>6} "
              f"{cell('facts'):>20} {objs}")  # fmt: skip


if __name__ == "__main__":
    main()
