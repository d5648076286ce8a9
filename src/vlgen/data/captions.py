"""The base of the caption data modules: splits from annotation files, predict from a folder, loaders.

:class:`CaptionDataModule` holds what the image- and video-caption modules do alike: splits from annotation files
grouped by :func:`caption_items` (one sample per caption for training, one per image or video with every caption as
references for evaluation), predict from a folder (:func:`media_files`), transforms asked of the attached model,
loaders and the summary line. A subclass says how one sample is loaded (:meth:`CaptionDataModule._dataset`).
The training loader's position is part of the module's ``state_dict`` (so of every checkpoint): a run resumed from a
mid-epoch checkpoint trains on exactly the batches, and draws exactly the augmentations, of an uninterrupted one
(:mod:`vlgen.data.resume`).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vlgen.data.common import (
    BadRecords,
    CaptionCollate,
    CaptionSample,
    clean_captions,
    make_loader,
    read_records,
    require_file,
)
from vlgen.data.resume import EpochBatches, ResumableLoader, batches_this_epoch, run_seed, trainer_world
from vlgen.data.vqa import VQAQuestion, VQATask
from vlgen.errors import ConfigError
from vlgen.interfaces import ProvidesImageTransform
from vlgen.loading import package_path

log = logging.getLogger(__name__)
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}
Transform = Callable[[Image.Image], Any]


class CaptionItem(NamedTuple):
    """One sample before loading: media path (relative to the media root), its captions, its id, and the text of
    its own the model reads before the caption (a question, an instruction), if any.

    A VQA sample also carries ``weights`` (training: one per target in ``captions``, their share of the annotators)
    and the question's ``answer_type`` / ``question_type`` when its file has them (evaluation: per-type accuracy).
    """

    path: str
    captions: tuple[str, ...]
    id: str
    prompt: str | None = None
    weights: tuple[float, ...] | None = None
    answer_type: str | None = None
    question_type: str | None = None


def caption_items(
    path: Path, field: str, train: bool, bad: BadRecords, prompt_field: str | None = None
) -> list[CaptionItem]:
    """The samples of an annotation file whose records name their image or video in ``field``.

    Training yields one item per (media, caption) pair; evaluation one item per ``{field}_id`` (default: the media
    path) with the captions of all its records as references, in order of first appearance. With ``prompt_field``
    each record must also hold a non-empty text there, and evaluation groups by (media, text): one image asked two
    questions is two samples, ``ID#0`` and ``ID#1`` in order of first appearance.
    """
    items: list[CaptionItem] = []
    groups: dict[tuple[str, str | None], tuple[str, list[str]]] = {}  # (media id, text) -> (media path, captions)
    for where, record in read_records(path, bad):
        media = record.get(field)
        if not isinstance(media, str) or not media.strip():
            bad(where, f"no '{field}' field")
            continue
        prompt = None
        if prompt_field is not None:
            prompt = record.get(prompt_field)
            if not isinstance(prompt, str) or not prompt.strip():
                bad(where, f"no '{prompt_field}' text")
                continue
            prompt = prompt.strip()
        caps = clean_captions(record.get("caption"), where, bad)
        media_id = str(record.get(f"{field}_id", media))
        if train:
            items += [CaptionItem(media, (c,), media_id, prompt) for c in caps]
        elif caps:
            groups.setdefault((media_id, prompt), (media, []))[1].extend(caps)
    asked: dict[str, int] = {}  # media id -> texts seen so far (the suffix of prompted samples' ids)
    for (media_id, prompt), (media, caps) in groups.items():
        sample_id = media_id
        if prompt is not None:
            sample_id = f"{media_id}#{asked.get(media_id, 0)}"
            asked[media_id] = asked.get(media_id, 0) + 1
        items.append(CaptionItem(media, tuple(caps), sample_id, prompt))
    return items


def vqa_items(task: VQATask, questions: list[VQAQuestion], train: bool, bad: BadRecords) -> list[CaptionItem]:
    """One item per question: its prompt text, and as captions its training targets (with their weights) or, for
    evaluation, every answer in the file's order (none for a test-dev split)."""
    items = []
    for q in questions:
        if train:
            targets, weights = task.targets(q)
            if not targets:
                bad(f"question {q.id}", "no answers to train on")
                continue
        else:
            targets, weights = q.answers, None
        items.append(
            CaptionItem(q.media, targets, q.id, task.prompt(q.question), weights, q.answer_type, q.question_type)
        )
    return items


def caption_sample(item: CaptionItem, pixels: Any) -> CaptionSample:
    """The loaded sample of ``item``: its first caption is the training target, all are references (weighted
    targets, a VQA training sample's, go as ``targets`` / ``target_weights``)."""
    caption = item.captions[0] if item.captions else ""
    sample = CaptionSample(pixels=pixels, caption=caption, references=list(item.captions), id=item.id)
    if item.prompt is not None:
        sample["prompt"] = item.prompt
    if item.weights is not None:
        sample["targets"], sample["target_weights"] = list(item.captions), list(item.weights)
    if item.answer_type is not None:
        sample["answer_type"] = item.answer_type
    if item.question_type is not None:
        sample["question_type"] = item.question_type
    return sample


def media_files(folder: Path, suffixes: frozenset[str], option: str) -> list[str]:
    """Files below ``folder`` with one of ``suffixes`` (any case), relative and sorted; errors name ``option``.

    Nothing is dropped without a word. A name with a media suffix that does not lead to a readable regular file is
    logged by name, with the count, in one warning: a dangling symlink or an unreadable file stays in the list, so the
    dataset counts it as a bad sample when loading (or raises, under ``skip_bad_samples: false``); a special file
    (a FIFO, a socket, a device) is left out, since opening it can block. Files with other suffixes are ignored, and
    one info line says how many, with the first few names.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{option}: {folder} does not exist")
    names: list[str] = []
    odd: list[str] = []  # media names that are not readable regular files, each with what is wrong
    ignored: list[str] = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            continue
        if path.suffix.lower() not in suffixes:
            ignored.append(name)
        elif path.is_file():
            names.append(name)
            if not os.access(path, os.R_OK):
                odd.append(f"{name} (not readable)")
        elif not path.exists():  # a symlink to nowhere (or a loop of them)
            names.append(name)
            odd.append(f"{name} (dangling symlink)")
        else:
            odd.append(f"{name} (not a regular file: left out)")
    if odd:
        log.warning("%s: %d of the media files in %s cannot be read: %s", option, len(odd), folder, ", ".join(odd))
    if ignored:
        shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        log.info("%s: ignored %d files in %s without a media suffix: %s", option, len(ignored), folder, shown)
    names.sort()
    if not names:
        raise ConfigError(f"{option}: {folder} holds no {'/'.join(sorted(suffixes))} files")
    return names


def default_transform(image_size: int) -> Transform:
    """Resize the short side, centre-crop, scale to [-1, 1]; used only when no model provides a transform."""
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    return transforms.Compose([*steps, transforms.Normalize([0.5] * 3, [0.5] * 3)])


def choose_transform(
    datamodule: pl.LightningDataModule, train: bool, fixed: tuple[Transform, Transform] | None, image_size: int
) -> Transform:
    """The per-image transform of a data module: ``fixed`` (train, eval) if set, else the attached model's
    ``image_transform(train)``, else :func:`default_transform`."""
    if fixed is not None:
        return fixed[0 if train else 1]
    module = datamodule.trainer.lightning_module if datamodule.trainer is not None else None
    if isinstance(module, ProvidesImageTransform):
        return module.image_transform(train)
    return default_transform(image_size)


class CaptionDataModule(pl.LightningDataModule, ABC):
    """Caption splits from annotation files under one root, plus predict from a folder; the base of the image and
    video modules, whose ``__init__`` documents the arguments. Subclasses set ``media_field`` (the record field naming
    the file, ``"image"`` or ``"video"``) and ``media_suffixes`` and implement :meth:`_dataset`.
    """

    media_field: ClassVar[str]
    media_suffixes: ClassVar[frozenset[str]]
    train_loader: ResumableLoader | None = None  # the training position lives here (see :meth:`state_dict`)
    _restored: dict[str, int] | None = None  # a checkpoint's position, for the next training loader

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
        prompt_field: str | None = None,
        task: VQATask | None = None,
    ) -> None:
        super().__init__()
        if task is not None and prompt_field is not None:
            raise ConfigError("data.prompt_field: a VQA task reads the question itself; leave prompt_field null")
        self.root, self.files, self.prompt_field, self.task = Path(root), files, prompt_field, task
        self.media_root = Path(media_root) if media_root else self.root
        self.predict_dir = Path(package_path(predict_dir, "data.predict_dir")) if predict_dir else None
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

    @abstractmethod
    def _dataset(self, items: list[CaptionItem], media_root: Path, transform: Transform, train: bool) -> Dataset:
        """The dataset loading ``items`` (it must keep ``transform`` in a ``transform`` attribute)."""

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
        return choose_transform(self, train, self._transforms, self.image_size)

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
        if self.task is not None:
            questions = self.task.questions(path, self.root, split, self.media_field, bad)
            items = vqa_items(self.task, questions, split == "train", bad)
        else:
            items = caption_items(path, self.media_field, split == "train", bad, self.prompt_field)
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

    def _loader(self, split: str, batch_size: int) -> DataLoader | ResumableLoader | list:
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        if split not in self.datasets:  # its file is null: Lightning skips an empty list of loaders
            return []
        dataset = self.datasets[split]
        dataset.transform = self._transform(split == "train")  # the model may have changed since setup
        collate = CaptionCollate(self._pixel_shape(dataset.transform))  # the pixels of an all-bad batch
        if split == "train":
            return self._train_loader(dataset, batch_size, collate)
        return make_loader(dataset, batch_size, False, self.num_workers, self.pin_memory, collate)

    def _train_loader(self, dataset: Dataset, batch_size: int, collate: CaptionCollate) -> ResumableLoader:
        """The resumable training loader (:mod:`vlgen.data.resume`): epoch ``e`` in the order of ``(seed, e)``,
        sharded over the trainer's ranks, each sample's augmentation seeded by its position, starting past a restored
        position's samples. The seed is the module's ``seed`` where it has one, else the run's (``seed_everything``).
        """
        trainer = self.trainer
        rank, world = trainer_world(trainer)
        seed = getattr(self, "seed", None)
        order = EpochBatches(len(dataset), batch_size, run_seed() if seed is None else int(seed), rank, world)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
        progress_fn = (lambda: batches_this_epoch(trainer)) if trainer is not None else None
        loader = ResumableLoader(dataset, order, collate, self.num_workers, self.pin_memory, epoch_fn, progress_fn)
        if self._restored is not None:
            loader.load_state_dict(self._restored)
            self._restored = None
        self.train_loader = loader
        return loader

    def train_dataloader(self) -> ResumableLoader | list:
        return self._loader("train", self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The training position (Lightning saves it in every checkpoint): ``{"train_position": {"epoch",
        "consumed", "batches", "seed"}}``, ``consumed`` counting the epoch's samples trained on over all ranks."""
        if self.train_loader is None:
            return {"train_position": self._restored} if self._restored else {}
        position = self.train_loader.state_dict()
        return {"train_position": position} if position else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at a checkpoint's training position: the next training loader starts past its samples."""
        self._restored = state_dict.get("train_position")
        if self.train_loader is not None and self._restored is not None:
            self.train_loader.load_state_dict(self._restored)

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
