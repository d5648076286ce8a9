"""W&B caption tables (offline, no account) and the `vlgen make-world` verb."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch

from vlgen.callbacks import CaptionTable
from vlgen.callbacks.caption_table import to_uint8_image
from vlgen.cli import main


def test_caption_table_logs_to_offline_wandb(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="vlgen-test", save_dir=str(tmp_path), offline=True)
    tables = []
    monkeypatch.setattr(logger, "log_table", lambda key, columns, data: tables.append((key, columns, data)))

    class Module(pl.LightningModule):
        logged_samples: ClassVar[list[dict]] = [
            {
                "pixels": torch.randn(3, 8, 8),
                "caption": "a red circle",
                "references": ["a red circle", "red"],
                "id": "0",
            }
        ]

    trainer = pl.Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False)
    CaptionTable().on_validation_epoch_end(trainer, Module())
    assert tables and tables[0][0] == "val/captions"
    assert tables[0][1] == ["id", "image", "generated", "references"]
    assert tables[0][2][0][2] == "a red circle" and tables[0][2][0][3] == "a red circle | red"
    logger.experiment.finish()
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "wandb").iterdir())


def test_an_offline_run_directory_holds_its_table_images(tmp_path, monkeypatch):
    """The real package, nothing mocked: after an offline run the PNGs of the caption table lie inside the run
    directory, and every local file the run's record names lies there too (what ``wandb sync`` uploads)."""
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    logger = WandbLogger(project="vlgen-test", save_dir=str(tmp_path), offline=True)

    class Module(pl.LightningModule):
        logged_samples: ClassVar[list[dict]] = [
            {"pixels": torch.randn(3, 8, 8), "caption": f"caption {i}", "references": ["r"], "id": str(i)}
            for i in range(2)
        ]

    trainer = pl.Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False)
    CaptionTable().on_validation_epoch_end(trainer, Module())
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    assert "WANDB_DATA_DIR" not in os.environ  # set for the call only
    pngs = []
    for f in run_dir.rglob("*"):
        if f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
            pngs.append(f)
    assert len(pngs) == 2 and all(Image.open(f).size == (8, 8) for f in pngs)
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    named = {m.decode() for m in re.findall(rb"/[\w./+-]*?/staging/tmp[a-z0-9_]{8}", record)}  # mkstemp names
    assert named and all(Path(p).is_relative_to(run_dir) and Path(p).is_file() for p in named)


def test_image_for_tables_spans_the_byte_range():
    img = to_uint8_image(torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4))
    assert img.shape == (4, 4, 3) and img.min() == 0 and img.max() == 255
    frames = torch.arange(5.0)[:, None, None, None].expand(5, 3, 4, 4)  # frame k is all k
    clip = to_uint8_image(frames)  # a video: its frames in a row, left to right
    assert clip.shape == (4, 20, 3)
    assert [int(clip[0, 4 * k, 0]) for k in range(5)] == [0, 64, 128, 191, 255]


def test_make_world_verb(tmp_path, capsys):
    root = tmp_path / "w"
    main(
        [
            "make-world",
            str(root),
            "--world.num_train",
            "3",
            "--world.num_val",
            "2",
            "--world.num_test",
            "2",
            "--world.num_text",
            "10",
        ]
    )
    assert capsys.readouterr().out.strip() == str(root)
    assert len(json.loads((root / "test.json").read_text())) == 2
    assert os.path.isfile(root / "world.json")
