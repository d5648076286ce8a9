"""A Lightning run over image shards that records which sample ids each rank trains on (run by test_shards_ddp.py,
as a script, because Lightning's DDP launcher starts the other ranks by running the script again)."""

from __future__ import annotations

import argparse
import json
import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlgen.data import ImageShardDataModule


class Recorder(pl.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out

    def training_step(self, batch, batch_idx):
        with open(f"{self.out}/rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": self.current_epoch, "ids": batch["ids"]}) + "\n")
        return (self.weight * batch["pixels"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--ckpt_every", type=int, default=0)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--ckpt_epoch_end", action="store_true", help="save a checkpoint at the end of each epoch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pl.seed_everything(0)
    data = ImageShardDataModule(train_shards=args.shards, batch_size=2, num_workers=args.workers, image_size=8,
                                shuffle_block=8, index_dir=args.index)  # fmt: skip
    callbacks = []
    if args.ckpt_epoch_end:
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{epoch}", save_top_k=-1))
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out, filename="{step}", every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, max_steps=args.max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.ckpt_every or args.ckpt_epoch_end),
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(Recorder(args.out), datamodule=data, ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
