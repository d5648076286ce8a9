"""A W&B table of validation images with their generated and reference captions, once per validation run.

It reads ``logged_samples`` (:class:`~vlgen.interfaces.LogsSamples`) that the captioning module keeps from its first
validation batch and does nothing when no ``WandbLogger`` is attached, so it can stay in every config. Images get their
true colours back as in ``gallery.html`` (:func:`vlgen.gallery.to_uint8_image` undoes the encoder's normalisation). The
images of a table are kept inside the W&B run directory (:func:`staged_in_run`), so an offline run synced later
carries them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from vlgen.gallery import module_normalisation, to_uint8_image
from vlgen.interfaces import LogsSamples

__all__ = ["CaptionTable", "staged_in_run", "to_uint8_image"]


class CaptionTable(pl.Callback):
    """Log ``val/captions`` (image, generated, references) to every W&B logger of the run.

    Args:
        key: the table's name in W&B.
    """

    def __init__(self, key: str = "val/captions") -> None:
        self.key = key

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = pl_module.logged_samples if isinstance(pl_module, LogsSamples) else None
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not samples or not loggers or not trainer.is_global_zero:
            return
        import wandb

        stats = module_normalisation(pl_module)
        rows = [
            [s["id"], wandb.Image(to_uint8_image(s["pixels"], stats)), s["caption"], " | ".join(s["references"])]
            for s in samples
        ]
        for logger in loggers:
            with staged_in_run(logger):
                logger.log_table(key=self.key, columns=["id", "image", "generated", "references"], data=rows)


@contextmanager
def staged_in_run(logger: WandbLogger) -> Iterator[None]:
    """Stage a table's media inside the W&B run's own directory while it is logged.

    W&B logs a table as an artifact whose files (the PNGs) it copies to a staging folder, by default under the
    user's home (``~/.local/share/wandb``), and the run's record points there: an offline run synced from another
    machine, or after that folder is cleaned, would lose its images. Unless the user set ``WANDB_DATA_DIR``, it
    points to the run directory (``.../wandb/offline-run-*/``) for the call, so the run directory holds them.
    """
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    run_dir = Path(logger.experiment.dir).parent  # experiment.dir is <run dir>/files
    os.environ["WANDB_DATA_DIR"] = str(run_dir)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)
