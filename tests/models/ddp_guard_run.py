"""Two-rank CPU (gloo) DDP runs of a tiny Captioner for test_guards.py, as a script: Lightning's DDP launcher starts
the other rank by running this script again.

Run 1: every batch rank 1 gets has no readable sample; the run must finish, with rank 1 taking part in every
gradient all-reduce and the skips summed over ranks. Run 2: rank 1's first batch gives a NaN loss; both ranks must
stop with the same one-line error, before the optimiser step. Each rank writes ``rank<R>.json`` into ``--out``.
With ``--strategy fsdp2`` the same runs are sharded (Lightning's ``ModelParallelStrategy``): a step where any rank's
batch is empty is skipped by every rank, so run 1 takes no step at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from vlgen.bridges import MLPProjector
from vlgen.callbacks import GroundingMonitor
from vlgen.encoders import TimmEncoder
from vlgen.errors import RunStopped
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner, Optim

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}


def batch(ids: list[str], nan: bool = False, skipped: int = 0) -> dict:
    """A caption batch of ``ids`` (NaN pixels with ``nan``), or an empty one when ``ids`` is empty."""
    pixels = torch.full((len(ids), 3, 32, 32), float("nan")) if nan else torch.randn(len(ids), 3, 32, 32)
    caps = ["a red circle"] * len(ids)
    return {"pixels": pixels, "captions": caps, "references": [[c] for c in caps], "ids": ids, "num_skipped": skipped}


def model(llm_dir: str) -> Captioner:
    torch.manual_seed(0)  # the same initial weights on both ranks
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    llm = CausalLM(llm_dir, decoding=Decoding(max_new_tokens=2))
    return Captioner(enc, MLPProjector(), llm, optim=Optim(lr=1e-2, warmup_steps=0, weight_decay=0.0))


def fit(m: Captioner, batches: list[dict], strategy: str = "ddp", callbacks: list | None = None) -> pl.Trainer:
    """Fit one epoch; the default DistributedSampler (no shuffling) gives rank r the batches r, r + 2, ..."""
    timeout = timedelta(seconds=60)
    if strategy == "fsdp2":
        chosen = ModelParallelStrategy(2, 1, save_distributed_checkpoint=False, process_group_backend="gloo",
                                       timeout=timeout)  # fmt: skip
    else:
        chosen = DDPStrategy(process_group_backend="gloo", timeout=timeout)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=chosen,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def bridge_weights(m: Captioner) -> list[float]:
    """The sum of each bridge weight (of the whole weight when sharded: a collective then)."""
    whole = (getattr(p, "full_tensor", lambda p=p: p)() for p in m.bridge.parameters())
    return [float(p.detach().double().sum()) for p in whole]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    result: dict = {}

    m = model(args.llm)
    result["initial"] = bridge_weights(m)
    # rank 0: batches 0 and 2 (readable); rank 1: batches 1 and 3 (every sample unreadable)
    monitor = GroundingMonitor(every_n_steps=1, warmup_steps=0, attention=False)  # a check after every batch
    trainer = fit(
        m,
        [batch(["s0", "s1"]), batch([], skipped=2), batch(["s2", "s3"]), batch([], skipped=2)],
        args.strategy,
        [monitor],
    )
    result["grounding_checks"] = len(monitor.history)
    result["global_step"] = trainer.global_step
    result["train_skipped"] = float(trainer.callback_metrics["train/skipped"])
    result["trained"] = bridge_weights(m)
    result["finite"] = all(bool(p.isfinite().all()) for p in m.bridge.parameters())
    rank = trainer.global_rank

    m = model(args.llm)
    before = bridge_weights(m)
    try:  # rank 0: batch 0 (readable); rank 1: batch 1 (NaN pixels, so a NaN loss)
        batches = [batch(["g0", "g1"]), batch(["bad0", "bad1"], nan=True), batch(["g2", "g3"]), batch(["g4", "g5"])]
        fit(m, batches, args.strategy)
        result["stopped"] = None
    except RunStopped as err:
        result["stopped"] = str(err)
    result["unchanged"] = bridge_weights(m) == before
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # both files are written before rank 0 (the test's process) exits


if __name__ == "__main__":
    main()
