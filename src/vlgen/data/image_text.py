"""Image-caption data: COCO-style annotation files plus an image folder, as a LightningDataModule.

Annotation files are a JSON list or JSONL of records with ``image`` (path relative to the image root), ``caption``
(a string or a list, as in the COCO Karpathy files) and an optional ``image_id`` (default: the image path).
Training yields one sample per (image, caption) pair; validation, test and predict-from-test yield one sample per
image with all of its captions as references (records are grouped by ``image_id``). Batches carry raw strings (the
model tokenises) and images transformed as the model's encoder expects: the module asks the attached
LightningModule for ``image_transform(train)``. Unusable records and unreadable images are skipped and counted
(see :mod:`vlgen.data.common`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from vlgen.data.common import (
    BadFiles,
    BadRecords,
    CaptionCollate,
    CaptionSample,
    clean_captions,
    make_loader,
    read_records,
    require_file,
)
from vlgen.data.synthetic.shapes import BACKGROUND, ShapesWorld
from vlgen.errors import ConfigError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
Transform = Callable[[Image.Image], Any]


class ImageItem(NamedTuple):
    """One sample before loading: image path (relative to the image root), its captions, its id."""

    image: str
    captions: tuple[str, ...]
    id: str


def default_transform(image_size: int) -> Transform:
    """Resize the short side, centre-crop, scale to [-1, 1]; used only when no model provides a transform."""
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


class ImageCaptionDataset(Dataset):
    """Loads and transforms the images of :class:`ImageItem` s; an unreadable image comes back as ``None``.

    Args:
        items: the samples.
        image_root: directory the items' image paths are relative to.
        transform: PIL RGB image -> tensor ``[C, H, W]``.
        strict: raise on an unreadable image instead of skipping it.
    """

    def __init__(self, items: list[ImageItem], image_root: Path, transform: Transform, strict: bool) -> None:
        self.items, self.image_root, self.transform = items, image_root, transform
        self.bad_files = BadFiles(strict)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> CaptionSample | None:
        item = self.items[index]
        path = self.image_root / item.image
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # decodes the whole file: a truncated one fails here, not in the model
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            self.bad_files(str(path), err)
            return None
        caption = item.captions[0] if item.captions else ""
        return CaptionSample(pixels=self.transform(rgb), caption=caption, references=list(item.captions), id=item.id)


class ImageTextDataModule(pl.LightningDataModule):
    """COCO-style image-caption splits from one root.

    Args:
        root: directory holding the annotation files (and the images unless ``image_root`` is given).
        train_file: training annotations, relative to ``root`` (null: no training split).
        val_file: validation annotations (null: no validation).
        test_file: test annotations.
        image_root: directory the image paths of the annotations are relative to (default: ``root``).
        predict_dir: a folder of images to caption with ``vlgen predict`` (default: the test split).
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to the GPU.
        skip_bad_samples: skip (log and count) unusable records and unreadable images; false raises on the first.
        image_size: image side of the fallback transform, used only without a model that provides one.
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
        self.bad_records_per_file: dict[str, int] = {}
        self.datasets: dict[str, ImageCaptionDataset] = {}
        self._transforms: tuple[Transform, Transform] | None = None
        if generate is None:
            for option, path in (("data.root", self.root), ("data.image_root", self.image_root)):
                if not path.is_dir():
                    raise FileNotFoundError(f"{option}: {path} does not exist")

    @property
    def num_bad_records(self) -> int:
        """Annotation records skipped so far, over all files read (per file: ``bad_records_per_file``)."""
        return sum(self.bad_records_per_file.values())

    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate.write(self.root)

    def set_transforms(self, train_tf: Transform, eval_tf: Transform) -> None:
        """Use these transforms instead of asking the LightningModule (for use outside a Trainer)."""
        self._transforms = (train_tf, eval_tf)

    def _transform(self, train: bool) -> Transform:
        if self._transforms is not None:
            return self._transforms[0 if train else 1]
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and callable(getattr(module, "image_transform", None)):
            return module.image_transform(train)
        return default_transform(self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.generate is not None:
            self.generate.write(self.root)  # a no-op when prepare_data (or another process) already wrote it
        for split in STAGE_SPLITS.get(stage or "", ("train", "val", "test")):
            if split in self.datasets:
                self.datasets[split].transform = self._transform(split == "train")
            elif split == "predict":
                self.datasets[split] = self._predict_split()
            elif self.files[split] is not None:
                self.datasets[split] = self._annotated_split(split)
        log.info("data: %s", self.summary())

    def _annotated_split(self, split: str) -> ImageCaptionDataset:
        option = f"data.{split}_file"
        path = require_file(self.root / str(self.files[split]), option)
        bad = BadRecords(path, self.strict)
        train = split == "train"
        items: list[ImageItem] = []
        groups: dict[str, tuple[str, list[str]]] = {}  # image_id -> (image, every caption of it)
        for where, record in read_records(path, bad):
            image = record.get("image")
            if not isinstance(image, str) or not image.strip():
                bad(where, "no 'image' field")
                continue
            caps = clean_captions(record.get("caption"), where, bad)
            image_id = str(record.get("image_id", image))
            if train:  # one sample per (image, caption) pair
                items += [ImageItem(image, (c,), image_id) for c in caps]
            elif caps:  # one sample per image, every caption a reference
                groups.setdefault(image_id, (image, []))[1].extend(caps)
        items += [ImageItem(image, tuple(caps), image_id) for image_id, (image, caps) in groups.items()]
        self.bad_records_per_file[str(path)] = bad.count
        if not items:
            raise ConfigError(f"{option}: {path} holds no usable records ({bad.count} skipped)")
        return ImageCaptionDataset(items, self.image_root, self._transform(train), self.strict)

    def _predict_split(self) -> ImageCaptionDataset:
        if self.predict_dir is None:
            if self.files["test"] is None:
                raise ConfigError("data.predict_dir: not set, and data.test_file is null: nothing to predict")
            return self._annotated_split("test")
        if not self.predict_dir.is_dir():
            raise FileNotFoundError(f"data.predict_dir: {self.predict_dir} does not exist")
        names = sorted(
            p.relative_to(self.predict_dir).as_posix()
            for p in self.predict_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not names:
            raise ConfigError(f"data.predict_dir: {self.predict_dir} holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
        items = [ImageItem(name, (), name) for name in names]
        return ImageCaptionDataset(items, self.predict_dir, self._transform(False), self.strict)

    def _loader(self, split: str, batch_size: int) -> DataLoader | list:
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        if split not in self.datasets:  # its file is null: Lightning skips an empty list of loaders
            return []
        dataset = self.datasets[split]
        dataset.transform = self._transform(split == "train")  # the model may have changed since setup
        probe = dataset.transform(Image.new("RGB", (self.image_size, self.image_size), BACKGROUND))
        collate = CaptionCollate(tuple(probe.shape))  # [C, H, W] of an all-bad batch's empty pixels
        return make_loader(dataset, batch_size, split == "train", self.num_workers, self.pin_memory, collate)

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict", self.eval_batch_size)

    def summary(self) -> str:
        """One line for logs: samples per split and the bad records skipped (per file when there are any)."""
        sizes = ", ".join(f"{split} {len(ds)}" for split, ds in self.datasets.items()) or "no split set up"
        text = f"{self.root}: {sizes} samples; {self.num_bad_records} bad records skipped"
        per_file = [f"{Path(f).name}: {n}" for f, n in self.bad_records_per_file.items() if n]
        return f"{text} ({', '.join(per_file)})" if per_file else text
