"""Image-caption data: COCO-style annotation files plus an image folder, as a LightningDataModule.

Annotation files are a JSON list or JSONL of records with ``image`` (path relative to the image root), ``caption``
(a string or a list, as in the COCO Karpathy files) and an optional ``image_id``. Training yields one sample per
(image, caption) pair; validation and test yield one sample per image with all of its captions as references.
Batches carry raw strings (the model tokenises) and images transformed as the model's encoder expects: the module
asks the attached LightningModule for ``image_transform(train)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from vlgen.data.common import SkipCounter, clean_captions, make_collate, read_records, require_file
from vlgen.data.synthetic.shapes import ShapesWorld

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class ImageCaptionDataset(Dataset):
    """``(image path, captions, id)`` items; unreadable images come back as ``None`` (dropped by the collate)."""

    def __init__(self, items: list[tuple[Path, list[str], str]], transform: Callable, strict: bool, train: bool):
        self.items = items
        self.transform = transform
        self.train = train
        self.skip = SkipCounter(strict)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, caps, sample_id = self.items[index]
        try:
            with Image.open(path) as img:
                pixels = self.transform(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:
            self.skip(str(path), f"{type(err).__name__}: {err}")
            return None
        return {
            "pixels": pixels,
            "captions": caps[0] if caps else "",
            "references": caps if not self.train else caps[:1],
            "ids": sample_id,
        }


def default_transform(image_size: int) -> Callable:
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


class ImageTextDataModule(pl.LightningDataModule):
    """COCO-style image-caption splits from one root.

    Args:
        root: directory holding the annotation files (and the images unless ``image_root`` is given).
        train_file: training annotations, relative to ``root`` (null: no training split).
        val_file: validation annotations (several captions per image become references).
        test_file: test annotations.
        image_root: directory image paths are relative to (default: ``root``).
        predict_dir: a folder of images to caption with ``vlgen predict`` (default: the test split).
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster GPU copies.
        skip_bad_samples: skip (log and count) unreadable images and records; false raises on the first one.
        image_size: image side for the fallback transform, used only without a model that provides one.
        generate: a synthetic world to write into ``root`` when it is not there yet.
    """

    def __init__(
        self,
        root: str,
        train_file: str | None = "train.json",
        val_file: str | None = "val.json",
        test_file: str | None = "test.json",
        image_root: str | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        skip_bad_samples: bool = True,
        image_size: int = 224,
        generate: ShapesWorld | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.image_root = Path(image_root) if image_root else self.root
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.strict = not skip_bad_samples
        self.image_size = image_size
        self.generate = generate
        self.num_bad_records: dict[str, int] = {}
        self.datasets: dict[str, ImageCaptionDataset] = {}
        self._transforms: tuple[Callable, Callable] | None = None
        if generate is None and not self.root.exists():
            raise FileNotFoundError(f"data.root: {self.root} does not exist")

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate.write(self.root)

    def set_transforms(self, train: Callable, evaluation: Callable) -> None:
        """Use these transforms instead of asking the LightningModule (for use outside a Trainer)."""
        self._transforms = (train, evaluation)

    def _transform(self, train: bool) -> Callable:
        if self._transforms is not None:
            return self._transforms[0 if train else 1]
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and hasattr(module, "image_transform"):
            return module.image_transform(train)
        return default_transform(self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.generate is not None:
            self.generate.write(self.root)  # no-op when prepare_data already wrote it (or another rank did)
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage or "fit", ["train", "val", "test"]):
            if split == "predict":
                self.datasets[split] = self._predict_dataset()
            elif self.files[split] is not None:
                self.datasets[split] = self._split(split)

    def _split(self, split: str) -> ImageCaptionDataset:
        path = require_file(self.root / str(self.files[split]), f"data.{split}_file")
        records, bad = read_records(path, self.strict)
        train = split == "train"
        grouped: dict[str, tuple[Path, list[str]]] = {}
        for record in records:
            caps = clean_captions(record.get("caption"))
            why = "no 'image' field" if not record.get("image") else None if caps else "empty caption"
            if why:
                if self.strict:
                    raise ValueError(f"{path}:{record['_where']}: {why}")
                log.warning("skipping %s:%s: %s", path, record["_where"], why)
                bad += 1
                continue
            image_id = str(record.get("image_id", record["image"]))
            key = f"{image_id}#{len(grouped)}" if train else image_id
            entry = grouped.setdefault(key, (self.image_root / record["image"], []))
            entry[1].extend(caps)
        self.num_bad_records[split] = bad
        if train:  # one sample per (image, caption) pair
            items = [(p, [c], k.rsplit("#", 1)[0]) for k, (p, caps) in grouped.items() for c in caps]
        else:  # one sample per image, every caption a reference
            items = [(p, caps, k) for k, (p, caps) in grouped.items()]
        log.info("%s: %d samples from %s (%d records skipped)", split, len(items), path, bad)
        return ImageCaptionDataset(items, self._transform(train), self.strict, train)

    def _predict_dataset(self) -> ImageCaptionDataset:
        if self.predict_dir is None:
            return self._split("test")
        if not self.predict_dir.is_dir():
            raise FileNotFoundError(f"data.predict_dir: {self.predict_dir} does not exist")
        files = sorted(p for p in self.predict_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        items = [(p, [], str(p.relative_to(self.predict_dir))) for p in files]
        return ImageCaptionDataset(items, self._transform(False), self.strict, train=False)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=make_collate(("pixels",)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)

    def summary(self) -> str:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.datasets.items())
        return f"{self.root} ({sizes}); bad records skipped: {self.num_bad_records}"
