"""Pieces every vlgen data module shares: tolerant annotation reading, a collate that drops bad samples, and the
caption data module base that the image- and video-caption modules specialise.

A long run must not die on one broken record or file. Records that cannot be used (a bad JSON line, a missing
field, an empty caption) are skipped when read, logged with the file name and position, and counted
(:class:`BadRecords`); samples whose file cannot be decoded come back from ``__getitem__`` as ``None``
(:class:`BadFiles` logs each file once) and the collate function drops and counts them, so the count travels with the
batch (``num_skipped``) out of dataloader workers. With ``strict=True`` both raise :class:`BadSample` instead.
:class:`CaptionDataModule` holds what the image and video modules do alike (splits from annotation files grouped by
:func:`caption_items`, predict from a folder, transforms from the model, loaders, the summary line); a subclass says
how one sample is loaded (:meth:`CaptionDataModule._dataset`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypedDict, TypeVar

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vlgen.errors import ConfigError
from vlgen.interfaces import CaptionBatch

log = logging.getLogger(__name__)
MAX_WARNINGS = 20  # per annotation file; further bad records are only counted
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
T = TypeVar("T")
Transform = Callable[[Image.Image], Any]


class BadSample(ValueError):
    """A record or file that cannot be used; raised only when bad samples are not skipped."""


def require_file(path: str | Path, option: str) -> Path:
    """``path`` as a Path, or a one-line ``FileNotFoundError`` naming the option when it does not exist."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}: {p} does not exist")
    return p


class BadRecords:
    """Counts the unusable records of one annotation file and logs the first few; raises instead when ``strict``."""

    def __init__(self, path: Path, strict: bool) -> None:
        self.path, self.strict, self.count = path, strict, 0

    def __call__(self, where: str, why: str) -> None:
        if self.strict:
            raise BadSample(f"{self.path}:{where}: {why}")
        self.count += 1
        if self.count <= MAX_WARNINGS:
            log.warning("skipping %s:%s: %s", self.path, where, why)
        elif self.count == MAX_WARNINGS + 1:
            log.warning("%s: more bad records; counting them without logging", self.path)


def read_records(path: Path, bad: BadRecords) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(position, record)`` for each JSON object of a JSON list, a JSONL file or an official COCO captions file.

    A whole file that is not JSON raises :class:`~vlgen.errors.ConfigError`; a bad JSONL line or a non-object entry
    goes to ``bad`` with its line or record number.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    whole: Any = None
    if text.lstrip().startswith(("[", "{")):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if isinstance(whole, dict) and "annotations" in whole and "images" in whole:  # captions_train2014.json
        files = {img.get("id"): img.get("file_name") for img in whole["images"] if isinstance(img, dict)}
        whole = [
            {"image": files.get(a.get("image_id")), "caption": a.get("caption"), "image_id": str(a.get("image_id"))}
            for a in whole["annotations"]
            if isinstance(a, dict)
        ]
    if isinstance(whole, (list, dict)):
        entries = list(enumerate(whole if isinstance(whole, list) else [whole]))
        located: Iterator[tuple[str, Any]] = ((f"record {i}", r) for i, r in entries)
    else:
        located = _jsonl(text, bad)
    for where, record in located:
        if isinstance(record, dict):
            yield where, record
        else:
            bad(where, "not a JSON object")


def _jsonl(text: str, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                bad(f"line {n}", f"bad JSON ({err.msg})")


def clean_captions(value: Any, where: str, bad: BadRecords) -> list[str]:
    """A caption field (a string or a list of strings) as stripped non-empty strings.

    A record without any caption goes to ``bad`` once (and ``[]`` comes back); empty entries of an otherwise usable
    list go to ``bad`` one by one.
    """
    items = value if isinstance(value, list) else [value]
    good = [c.strip() for c in items if isinstance(c, str) and c.strip()]
    if not good:
        bad(where, "no 'caption' field" if value is None else "empty caption")
    else:
        for k, caption in enumerate(items):
            if not (isinstance(caption, str) and caption.strip()):
                bad(f"{where} caption {k}", "empty caption")
    return good


class BadFiles:
    """Logs each unreadable file once (per process: every dataloader worker has its own); raises when ``strict``."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._seen: set[str] = set()

    def __call__(self, name: str, err: BaseException) -> None:
        if self.strict:
            raise BadSample(f"{name}: {type(err).__name__}: {err}") from err
        if name not in self._seen:
            self._seen.add(name)
            log.warning("skipping unreadable file %s: %s: %s", name, type(err).__name__, err)


def drop_bad(samples: Sequence[T | None]) -> tuple[list[T], int]:
    """The good samples and how many were ``None``."""
    good = [s for s in samples if s is not None]
    return good, len(samples) - len(good)


class CaptionSample(TypedDict):
    """One item of an image- or video-caption dataset, before collation into a :class:`CaptionBatch`."""

    pixels: Tensor
    caption: str
    references: list[str]
    id: str


@dataclass(frozen=True)
class CaptionCollate:
    """Collate :class:`CaptionSample` items (``None`` for unreadable ones) into a :class:`CaptionBatch`.

    Args:
        pixel_shape: shape of one sample's pixels (``[C, H, W]`` or ``[T, C, H, W]``), used for a batch in which
            every sample was bad: it still has pixels of shape ``[0, *pixel_shape]``.
    """

    pixel_shape: tuple[int, ...]

    def __call__(self, samples: Sequence[CaptionSample | None]) -> CaptionBatch:
        good, skipped = drop_bad(samples)
        if good:
            pixels = torch.stack([s["pixels"] for s in good])  # B x [C, H, W] -> [B, C, H, W] (or [B, T, C, H, W])
        else:
            pixels = torch.empty((0, *self.pixel_shape))
        return CaptionBatch(
            pixels=pixels,
            captions=[s["caption"] for s in good],
            references=[s["references"] for s in good],
            ids=[s["id"] for s in good],
            num_skipped=skipped,
        )


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool, collate: Callable
) -> DataLoader:
    """A DataLoader as every vlgen data module builds it (Lightning adds a DistributedSampler under DDP)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate,
    )


class CaptionItem(NamedTuple):
    """One sample before loading: media path (relative to the media root), its captions, its id."""

    path: str
    captions: tuple[str, ...]
    id: str


def caption_items(path: Path, field: str, train: bool, bad: BadRecords) -> list[CaptionItem]:
    """The samples of an annotation file whose records name their image or video in ``field``.

    Training yields one item per (media, caption) pair; evaluation one item per ``{field}_id`` (default: the media
    path) with the captions of all its records as references, in order of first appearance.
    """
    items: list[CaptionItem] = []
    groups: dict[str, tuple[str, list[str]]] = {}  # media id -> (media path, every caption of it)
    for where, record in read_records(path, bad):
        media = record.get(field)
        if not isinstance(media, str) or not media.strip():
            bad(where, f"no '{field}' field")
            continue
        caps = clean_captions(record.get("caption"), where, bad)
        media_id = str(record.get(f"{field}_id", media))
        if train:
            items += [CaptionItem(media, (c,), media_id) for c in caps]
        elif caps:
            groups.setdefault(media_id, (media, []))[1].extend(caps)
    return items + [CaptionItem(media, tuple(caps), media_id) for media_id, (media, caps) in groups.items()]


def media_files(folder: Path, suffixes: frozenset[str], option: str) -> list[str]:
    """Files below ``folder`` with one of ``suffixes`` (any case), relative and sorted; errors name ``option``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{option}: {folder} does not exist")
    found = (p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    names = sorted(p.relative_to(folder).as_posix() for p in found)
    if not names:
        raise ConfigError(f"{option}: {folder} holds no {'/'.join(sorted(suffixes))} files")
    return names


def default_transform(image_size: int) -> Transform:
    """Resize the short side, centre-crop, scale to [-1, 1]; used only when no model provides a transform."""
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    return transforms.Compose([*steps, transforms.Normalize([0.5] * 3, [0.5] * 3)])


class CaptionDataModule(pl.LightningDataModule):
    """Caption splits from annotation files under one root, plus predict from a folder; the base of the image and
    video modules, whose ``__init__`` documents the arguments. Subclasses set ``media_field`` (the record field naming
    the file, ``"image"`` or ``"video"``) and ``media_suffixes`` and implement :meth:`_dataset`.
    """

    media_field: ClassVar[str]
    media_suffixes: ClassVar[frozenset[str]]

    def __init__(
        self,
        root: str,
        files: dict[str, str | None],
        media_root: str | None,
        predict_dir: str | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        skip_bad_samples: bool,
        image_size: int,
        generate: Any = None,
    ) -> None:
        super().__init__()
        self.root, self.files = Path(root), files
        self.media_root = Path(media_root) if media_root else self.root
        self.predict_dir = Path(predict_dir) if predict_dir else None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.strict, self.image_size, self.generate = not skip_bad_samples, image_size, generate
        self.bad_records_per_file: dict[str, int] = {}
        self.datasets: dict[str, Any] = {}  # split -> a Dataset with a settable ``transform``
        self._transforms: tuple[Transform, Transform] | None = None
        if generate is None:
            for option, path in (("data.root", self.root), (f"data.{self.media_field}_root", self.media_root)):
                if not path.is_dir():
                    raise FileNotFoundError(f"{option}: {path} does not exist")

    def _dataset(self, items: list[CaptionItem], media_root: Path, transform: Transform, train: bool) -> Dataset:
        """The dataset loading ``items`` (it must keep ``transform`` in a ``transform`` attribute)."""
        raise NotImplementedError

    def _pixel_shape(self, transform: Transform) -> tuple[int, ...]:
        """Shape of one sample's pixels under ``transform`` (``[C, H, W]`` for an image)."""
        return tuple(transform(Image.new("RGB", (self.image_size, self.image_size))).shape)

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

    def _annotated_split(self, split: str) -> Dataset:
        option = f"data.{split}_file"
        path = require_file(self.root / str(self.files[split]), option)
        bad = BadRecords(path, self.strict)
        items = caption_items(path, self.media_field, split == "train", bad)
        self.bad_records_per_file[str(path)] = bad.count
        if not items:
            raise ConfigError(f"{option}: {path} holds no usable records ({bad.count} skipped)")
        return self._dataset(items, self.media_root, self._transform(split == "train"), split == "train")

    def _predict_split(self) -> Dataset:
        if self.predict_dir is None:
            if self.files["test"] is None:
                raise ConfigError("data.predict_dir: not set, and data.test_file is null: nothing to predict")
            return self._annotated_split("test")
        names = media_files(self.predict_dir, self.media_suffixes, "data.predict_dir")
        return self._dataset([CaptionItem(n, (), n) for n in names], self.predict_dir, self._transform(False), False)

    def _loader(self, split: str, batch_size: int) -> DataLoader | list:
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        if split not in self.datasets:  # its file is null: Lightning skips an empty list of loaders
            return []
        dataset = self.datasets[split]
        dataset.transform = self._transform(split == "train")  # the model may have changed since setup
        collate = CaptionCollate(self._pixel_shape(dataset.transform))  # the pixels of an all-bad batch
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
