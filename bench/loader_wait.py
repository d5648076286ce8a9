"""How long training waits for data: the data-loader wait as a share of training step time, for any config.

    python bench/loader_wait.py [--config configs/tiny/video_evlgen.yaml ...] [--steps 120] [--skip 10]
                                [--workers 0 1 2]

``--config`` may be given several times; they compose as on the command line (e.g. ``--config
configs/tiny/linear.yaml --config configs/tiny/shards_image.yaml`` for the image shards).

Runs ``vlgen fit`` in this process with a callback that stamps the start and end of every training batch: the gap
between one batch's end and the next one's start is time the loop spent waiting (fetching the next batch from the
loader, plus Lightning's own bookkeeping, so it is an upper bound on the loader's share), the rest is the step
itself. Validation is off so it does not count as waiting. The first ``--skip`` batches (worker start-up) are left
out. Prints, per number of dataloader workers: mean step time, mean wait, and wait / (wait + step).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl

from vlgen.cli import main as vlgen_main

REPO = Path(__file__).resolve().parents[1]
STAMPS: list[tuple[float, float]] = []  # (batch start, batch end) of the latest run


class LoaderWait(pl.Callback):
    """Stamp each training batch's start and end (``time.perf_counter``) into ``STAMPS``."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        STAMPS.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        STAMPS.append((time.perf_counter(), float("nan")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        STAMPS[-1] = (STAMPS[-1][0], time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="default: configs/tiny/video_evlgen.yaml")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    configs = args.config or [str(REPO / "configs" / "tiny" / "video_evlgen.yaml")]
    print(f"config: {' + '.join(configs)}; {args.steps} steps, first {args.skip} left out")
    print(f"{'workers':>7s} {'step ms':>8s} {'wait ms':>8s} {'wait share':>10s}")
    for workers in args.workers:
        vlgen_main([
            "fit", *[a for c in configs for a in ("--config", c)],
            "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=__main__.LoaderWait",
            "--data.init_args.num_workers", str(workers),
        ])  # fmt: skip
        runs = STAMPS[args.skip :]
        steps = [end - start for start, end in runs]
        waits = [start - prev_end for (_, prev_end), (start, _) in itertools.pairwise(runs)]
        share = sum(waits) / (sum(waits) + sum(steps[1:]))
        print(
            f"{workers:7d} {1000 * statistics.mean(steps):8.1f} {1000 * statistics.mean(waits):8.1f} "
            f"{100 * share:9.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
