"""Web-scale data: image, video and text corpora as WebDataset tar shards, alone or in weighted mixtures.

Shards are read as img2dataset / video2dataset write them (``KEY.jpg|png|webp`` or ``KEY.mp4|webm|avi``, ``KEY.txt``
caption, ``KEY.json`` metadata) through byte-offset indexes (:mod:`vlgen.data.shards.index`), so an epoch is an order
of positions fixed by the seed and the epoch alone (:mod:`vlgen.data.shards.order`), dealt to any number of ranks and
workers, each sample exactly once; the models get the same :class:`~vlgen.interfaces.CaptionBatch` (or
:class:`~vlgen.interfaces.TextBatch`) as from the JSON + folder modules.

Exact resume: the training position (epoch, position in it, batches trained) is part of the data module's
``state_dict``, which Lightning writes into every checkpoint and restores before building loaders; ``--ckpt_path``
continues at the next untrained sample, at the same or another world size. Remainder: every rank runs the same number
of steps; the last global batch of an epoch may be partial (each rank gets one sample fewer at most), and when it has
fewer samples than there are ranks it is left out of that epoch, logged and counted (``dropped_remainder``).

Bad data: a missing shard, a sample without its image or caption, a cut-off tar tail are named in the log once and
counted per source when the indexes are read; a member that does not decode is skipped per batch (``num_skipped``,
``train/skipped``); ``skip_bad_samples: false`` makes each an error. Per-source counts are logged as
``data/<source>/samples`` and ``data/<source>/skipped`` (rank 0's share, cumulative, kept across a resume), and
``data/<source>/unusable_in_index`` and ``data/<source>/missing_shards``.
"""

from __future__ import annotations

import io
import json
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlgen.data.captions import CaptionItem, Transform, choose_transform, media_files
from vlgen.data.common import BadFiles, BadSample, CaptionCollate, CaptionSample, make_loader, seeded_transform
from vlgen.data.image_text import IMAGE_SUFFIXES, ImageCaptionDataset
from vlgen.data.images import to_rgb
from vlgen.data.shards.index import Kind, media_ext
from vlgen.data.shards.order import dropped_remainder
from vlgen.data.shards.stream import Plan, RawSample, ShardLoader, ShardSource, ShardStream
from vlgen.data.shards.urls import expand_shards
from vlgen.data.shards.write import WorldShards
from vlgen.data.video_io import (
    VIDEO_SUFFIXES,
    Backend,
    FrameReader,
    FrameSampler,
    Sampling,
    VideoError,
    frame_samplers,
    make_reader,
)
from vlgen.data.video_text import VideoCaptionDataset, transform_clip
from vlgen.errors import ConfigError
from vlgen.interfaces import TextBatch
from vlgen.loading import package_path

log = logging.getLogger(__name__)
SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


@dataclass
class Source:
    """One corpus of a weighted mixture.

    Args:
        shards: a brace pattern, glob or URL, or a list of them.
        weight: relative sampling weight (EVLGen mixes LAION : CC+SBU : COCO as 15 : 4 : 1).
        name: shown in logs and per-source counts (default: ``source<i>``).
    """

    shards: str | list[str]
    weight: float = 1.0
    name: str | None = None


Shards = str | list[str] | list[Source]


def as_sources(spec: Shards, option: str) -> list[Source]:
    """A split's shard option as sources: a pattern or a list of patterns is one source; a list of sources a mixture."""
    if isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(s, str) for s in spec)):
        return [Source(spec)]
    sources = [s if isinstance(s, Source) else Source(**s) for s in spec]
    if not sources:
        raise ConfigError(f"{option}: no shards given")
    for s in sources:
        if not s.weight > 0:
            raise ConfigError(f"{option}: weight {s.weight} of {s.name or s.shards} is not positive")
    return sources


def caption_of(raw: RawSample) -> tuple[str, list[str], str]:
    """``(caption, references, id)`` of a sample from its ``txt`` and ``json`` members (ValueError: no caption).

    The training caption is ``KEY.txt`` (else the JSON's ``caption``); references are the JSON's ``captions`` list
    (else the caption alone); the id is the JSON's ``id`` (img2dataset: ``key``), else the sample key.
    """
    meta: dict[str, Any] = {}
    if "json" in raw:
        loaded = json.loads(raw["json"].decode("utf-8"))
        meta = loaded if isinstance(loaded, dict) else {}
    text = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    refs = [c.strip() for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    caption = text or (meta.get("caption") or "").strip() or (refs[0] if refs else "")
    if not caption:
        raise ValueError("empty caption")
    sample_id = meta.get("id", meta.get("key", raw["key"]))
    return caption, refs or [caption], str(sample_id)


class CaptionDecoder(ABC):
    """Raw sample -> :class:`CaptionSample`, or None (logged once per member, counted) when it cannot be used."""

    kind: ClassVar[Kind]

    def __init__(self, transform: Transform, strict: bool, seeded: bool = True) -> None:
        self.transform, self.strict, self.seeded = transform, strict, seeded
        self.bad_files = BadFiles(strict)

    def __call__(self, raw: RawSample, seed: int) -> CaptionSample | None:
        name = f"{raw['shard']}:{raw['key']}"
        try:
            caption, refs, sample_id = caption_of(raw)
            pixels = self.pixels(raw, raw[media_ext(raw, self.kind)], seed)
        except (OSError, ValueError, SyntaxError, UnicodeDecodeError, VideoError, Image.DecompressionBombError) as err:
            self.bad_files(name, err)
            return None
        return CaptionSample(pixels=pixels, caption=caption, references=refs, id=sample_id)

    @abstractmethod
    def pixels(self, raw: RawSample, data: bytes, seed: int) -> Any:
        """The transformed pixels of the media member ``data``."""


class ImageDecoder(CaptionDecoder):
    kind = "image"

    def pixels(self, raw: RawSample, data: bytes, seed: int) -> Any:
        with Image.open(io.BytesIO(data)) as img:
            rgb = to_rgb(img)  # decodes the whole image: a truncated one fails here
        return seeded_transform(self.transform, rgb, seed) if self.seeded else self.transform(rgb)


class VideoDecoder(CaptionDecoder):
    kind = "video"

    def __init__(self, transform: Transform, strict: bool, reader: FrameReader, sampler: FrameSampler) -> None:
        super().__init__(transform, strict)
        self.reader, self.sampler = reader, sampler

    def pixels(self, raw: RawSample, data: bytes, seed: int) -> Any:
        rng = random.Random(seed)
        frames = self.reader.read(io.BytesIO(data), lambda count: self.sampler(count, rng))  # [T, H, W, 3]
        return transform_clip(frames, self.transform, rng.getrandbits(32))  # [T, C, H, W]


class TextDecoder:
    """Raw text sample (``KEY.txt`` of a tar, or a line of a ``.txt`` / ``.jsonl`` file) -> sentence, or None."""

    def __init__(self, text_field: str, min_words: int, max_words: int | None, strict: bool) -> None:
        self.text_field, self.min_words, self.max_words, self.strict = text_field, min_words, max_words, strict
        self.filtered = 0

    def __call__(self, raw: RawSample, seed: int) -> str | None:
        try:
            if "txt" in raw:
                text = raw["txt"].decode("utf-8").strip()
            else:  # a .jsonl line, or a tar sample whose caption is in its .json
                value = json.loads(raw.get("jsonl", raw.get("json", b"{}")).decode("utf-8")).get(self.text_field)
                text = value.strip() if isinstance(value, str) else ""
        except (ValueError, AttributeError) as err:
            if self.strict:
                raise BadSample(f"{raw['shard']}:{raw['key']}: {err}") from err
            return None
        words = len(text.split())
        if not text or words < self.min_words or (self.max_words is not None and words > self.max_words):
            if self.strict and not text:
                raise BadSample(f"{raw['shard']}:{raw['key']}: no text")
            return None
        return text


def collate_text(samples: list[str | None]) -> TextBatch:
    good = [s for s in samples if s is not None]
    return TextBatch(text=good, num_skipped=len(samples) - len(good))


class ShardDataModule(pl.LightningDataModule, ABC):
    """The shard data modules' common part; the subclasses' ``__init__`` document the arguments."""

    kind: ClassVar[Kind]

    def __init__(
        self,
        train_shards: Shards | None,
        val_shards: Shards | None,
        test_shards: Shards | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        skip_bad_samples: bool,
        seed: int,
        shuffle_block: int,
        epoch_size: int | None,
        index_dir: str | None,
        generate: WorldShards | None,
    ) -> None:
        super().__init__()
        for option, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("shuffle_block", shuffle_block, 1)):  # fmt: skip
            if value < least:
                raise ConfigError(f"data.{option}: {value} is below {least}")
        self.specs = {"train": train_shards, "val": val_shards, "test": test_shards}
        if all(v is None for v in self.specs.values()):
            raise ConfigError("data.train_shards: no shards given for any split")
        self.sources_of = {s: as_sources(v, f"data.{s}_shards") for s, v in self.specs.items() if v is not None}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory, self.strict = num_workers, pin_memory, not skip_bad_samples
        self.seed, self.shuffle_block, self.epoch_size, self.index_dir = seed, shuffle_block, epoch_size, index_dir
        self.generate = generate
        self.plans: dict[str, Plan] = {}
        self.train_loader: ShardLoader | None = None
        self._restored: dict[str, int] | None = None
        self.source_totals: dict[str, dict[str, int]] = {}  # rank 0's per-source samples / skipped, cumulative

    # --- sources --------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.generate is not None:
            self.generate.write()

    def setup(self, stage: str | None = None) -> None:
        if self.generate is not None:
            self.generate.write()  # a no-op when prepare_data (or another process) already wrote it
        for split in SPLITS.get(stage or "", ("train", "val", "test")):
            if split in self.sources_of and split not in self.plans:
                self.plans[split] = self._plan(split)
                log.info("data %s: %s", split, "; ".join(s.summary() for s in self.plans[split].sources))

    def _plan(self, split: str) -> Plan:
        option = f"data.{split}_shards"
        sources = [
            ShardSource(
                s.name or (f"source{i}" if len(self.sources_of[split]) > 1 else split),
                expand_shards(s.shards, option), self.kind, s.weight, self.index_dir, self.strict, option,
            )
            for i, s in enumerate(self.sources_of[split])
        ]  # fmt: skip
        train = split == "train"
        return Plan(sources, self.seed, train, self.shuffle_block, self.epoch_size if train else None)

    # --- per kind -------------------------------------------------------------------------------------------------
    @abstractmethod
    def _decoder(self, train: bool) -> Any:
        """Raw sample and seed -> one sample (None when unusable)."""

    @abstractmethod
    def _collate(self, train: bool) -> Any:
        """List of samples -> batch."""

    # --- loaders --------------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str) -> ShardLoader | list:
        if split not in self.sources_of:
            return []  # Lightning skips an empty list of loaders
        if split not in self.plans:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        plan, train = self.plans[split], split == "train"
        world, rank = self._world()
        batch = self.batch_size if train else self.eval_batch_size
        decode, collate = self._decoder(train), self._collate(train)

        def stream(epoch: int, start: int) -> ShardStream:
            return ShardStream(plan, epoch, start, plan.epoch_size, world, rank, batch, not train, decode, collate,
                               self.strict)  # fmt: skip

        trainer = self.trainer
        epoch_fn = (lambda: trainer.current_epoch) if train and trainer is not None else None
        loader = ShardLoader(stream, self.num_workers, self.pin_memory, self.seed, epoch_fn if train else lambda: 0)
        if train:
            dropped = dropped_remainder(0, plan.epoch_size, world, batch, keep_short=False)
            if dropped:
                log.info("data train: %d samples of each epoch's last global batch (fewer than %d ranks) left out",
                         dropped, world)  # fmt: skip
            if self._restored is not None:
                loader.resume_at(**self._restored)
                log.info("data train: resuming epoch %d at position %d of %d (%d batches done)",
                         self._restored["epoch"], self._restored["position"], plan.epoch_size,
                         self._restored["batches"])  # fmt: skip
                self._restored = None
            self.train_loader = loader
        return loader

    def train_dataloader(self) -> ShardLoader | list:
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> ShardLoader | list:
        return self._loader("test")

    # --- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (saved in every checkpoint) and rank 0's per-source counts."""
        if self.train_loader is None:
            return {}
        processed = None
        if self.trainer is not None:
            processed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        position = self.train_loader.position_after(processed)
        return {"train_position": position, "source_totals": self.source_totals} if position else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("train_position")
        self.source_totals = state_dict.get("source_totals", {})

    # --- per-source counts ----------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        counts = batch.pop("source_counts", None) if isinstance(batch, dict) else None
        trainer = self.trainer
        if counts is None or trainer is None or not trainer.training:
            return batch
        for name, n, bad in zip(counts["names"], counts["samples"], counts["skipped"]):
            totals = self.source_totals.setdefault(name, {"samples": 0, "skipped": 0})
            totals["samples"] += n
            totals["skipped"] += bad
        step = trainer.global_step
        if trainer.logger is not None and trainer.is_global_zero and step % max(1, trainer.log_every_n_steps) == 0:
            metrics = {f"data/{name}/{k}": float(v) for name, t in self.source_totals.items() for k, v in t.items()}
            for src in self.plans["train"].sources:  # what the indexes left out, known from the start
                metrics[f"data/{src.name}/unusable_in_index"] = float(src.num_bad)
                metrics[f"data/{src.name}/missing_shards"] = float(len(src.missing))
            trainer.logger.log_metrics(metrics, step=step)
        return batch


class CaptionShardDataModule(ShardDataModule):
    """Image or video captions from shards; predict reads a folder (or the test shards)."""

    media_suffixes: ClassVar[frozenset[str]]

    def __init__(self, predict_dir: str | None, image_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.predict_dir = Path(package_path(predict_dir, "data.predict_dir")) if predict_dir else None
        self.image_size = image_size
        self._transforms: tuple[Transform, Transform] | None = None

    def set_transforms(self, train_tf: Transform, eval_tf: Transform) -> None:
        """Use these transforms instead of asking the LightningModule (for use outside a Trainer)."""
        self._transforms = (train_tf, eval_tf)

    def _transform(self, train: bool) -> Transform:
        return choose_transform(self, train, self._transforms, self.image_size)

    def _pixel_shape(self, transform: Transform) -> tuple[int, ...]:
        return tuple(transform(Image.new("RGB", (self.image_size, self.image_size))).shape)

    def _collate(self, train: bool) -> CaptionCollate:
        return CaptionCollate(self._pixel_shape(self._transform(train)))

    @abstractmethod
    def _folder_dataset(self, items: list[CaptionItem], root: Path, transform: Transform) -> Dataset:
        """The dataset of a predict folder."""

    def predict_dataloader(self) -> DataLoader | ShardLoader | list:
        if self.predict_dir is None:
            if "test" not in self.sources_of:
                raise ConfigError("data.predict_dir: not set, and data.test_shards is null: nothing to predict")
            return self._loader("test")
        names = media_files(self.predict_dir, self.media_suffixes, "data.predict_dir")
        transform = self._transform(False)
        dataset = self._folder_dataset([CaptionItem(n, (), n) for n in names], self.predict_dir, transform)
        collate = CaptionCollate(self._pixel_shape(transform))
        return make_loader(dataset, self.eval_batch_size, False, self.num_workers, self.pin_memory, collate)


class ImageShardDataModule(CaptionShardDataModule):
    """Image-caption shards (img2dataset's WebDataset output, or ``vlgen make-shards``), one source or a mixture.

    Args:
        train_shards: the training shards: a brace pattern (``data/cc3m/{00000..00331}.tar``), a glob, a URL or a list
            of them (one source), or a list of ``{shards, weight, name}`` (a weighted mixture). Null: no training.
        val_shards: validation shards (read once, in shard order); null: no validation.
        test_shards: test shards.
        predict_dir: a folder of images to caption with ``vlgen predict`` (default: the test shards);
            ``pkg:NAME/SUBDIR`` is a folder of an installed package.
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device (default: ``batch_size``).
        num_workers: dataloader worker processes per device.
        pin_memory: pin host memory for faster copies to the GPU.
        skip_bad_samples: skip (log and count) missing shards, unusable samples and undecodable members; false
            raises on the first.
        seed: seeds the order of every epoch and each sample's augmentation.
        shuffle_block: samples are shuffled inside windows of this many (after shuffling the shards); larger mixes
            more shards at once, smaller reads fewer shards at a time.
        epoch_size: positions per training epoch (default: every source's samples once; set it for mixtures).
        index_dir: where shard indexes are cached (default: ``$VLGEN_CACHE/shard-index``, ``~/.cache/vlgen``).
        image_size: image side of the fallback transform, used only without a model that provides one.
        generate: a synthetic world to write and convert to shards when they are not there yet.
    """

    kind = "image"
    media_suffixes = IMAGE_SUFFIXES

    def __init__(
        self,
        train_shards: Shards | None = None,
        val_shards: Shards | None = None,
        test_shards: Shards | None = None,
        predict_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        skip_bad_samples: bool = True,
        seed: int = 0,
        shuffle_block: int = 65536,
        epoch_size: int | None = None,
        index_dir: str | None = None,
        image_size: int = 224,
        generate: WorldShards | None = None,
    ) -> None:
        super().__init__(
            predict_dir=predict_dir, image_size=image_size, train_shards=train_shards, val_shards=val_shards,
            test_shards=test_shards, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            pin_memory=pin_memory, skip_bad_samples=skip_bad_samples, seed=seed, shuffle_block=shuffle_block,
            epoch_size=epoch_size, index_dir=index_dir, generate=generate,
        )  # fmt: skip

    def _decoder(self, train: bool) -> ImageDecoder:
        return ImageDecoder(self._transform(train), self.strict, seeded=train)  # evaluation transforms are fixed

    def _folder_dataset(self, items: list[CaptionItem], root: Path, transform: Transform) -> Dataset:
        return ImageCaptionDataset(items, root, transform, self.strict)


class VideoShardDataModule(CaptionShardDataModule):
    """Video-caption shards (video2dataset's layout: ``KEY.mp4|webm|avi`` + ``KEY.txt`` / ``KEY.json``).

    Args:
        train_shards: as for :class:`ImageShardDataModule` (e.g. WebVid shards, or a weighted video mixture).
        val_shards: validation shards.
        test_shards: test shards.
        predict_dir: a folder of videos to caption with ``vlgen predict`` (default: the test shards).
        num_frames: frames per clip.
        train_sampling: ``headtail`` (EVLGen), ``random`` or ``uniform``.
        eval_sampling: how evaluation clips choose frames.
        min_frames: videos with fewer decodable frames are skipped (default: ``num_frames``).
        backend: ``decord`` or ``pyav``; both read the member from memory.
        batch_size: training batch size per device.
        eval_batch_size: evaluation batch size per device (default: ``batch_size``).
        num_workers: dataloader worker processes per device.
        pin_memory: pin host memory.
        skip_bad_samples: skip (log and count) unusable shards, samples and videos; false raises on the first.
        seed: seeds the order of every epoch, each clip's frames and augmentation.
        shuffle_block: shuffle window in samples.
        epoch_size: positions per training epoch (default: every source's samples once).
        index_dir: where shard indexes are cached.
        image_size: frame side of the fallback transform.
        generate: a synthetic video world to write and convert to shards when they are not there yet.
    """

    kind = "video"
    media_suffixes = VIDEO_SUFFIXES

    def __init__(
        self,
        train_shards: Shards | None = None,
        val_shards: Shards | None = None,
        test_shards: Shards | None = None,
        predict_dir: str | None = None,
        num_frames: int = 4,
        train_sampling: Sampling = "headtail",
        eval_sampling: Sampling = "uniform",
        min_frames: int | None = None,
        backend: Backend = "decord",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        skip_bad_samples: bool = True,
        seed: int = 0,
        shuffle_block: int = 16384,
        epoch_size: int | None = None,
        index_dir: str | None = None,
        image_size: int = 224,
        generate: WorldShards | None = None,
    ) -> None:
        self.samplers = frame_samplers(num_frames, train_sampling, eval_sampling, min_frames)  # by train
        self.reader = make_reader(backend)
        super().__init__(
            predict_dir=predict_dir, image_size=image_size, train_shards=train_shards, val_shards=val_shards,
            test_shards=test_shards, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            pin_memory=pin_memory, skip_bad_samples=skip_bad_samples, seed=seed, shuffle_block=shuffle_block,
            epoch_size=epoch_size, index_dir=index_dir, generate=generate,
        )  # fmt: skip
        self.num_frames = num_frames

    def _decoder(self, train: bool) -> VideoDecoder:
        return VideoDecoder(self._transform(train), self.strict, self.reader, self.samplers[train])

    def _pixel_shape(self, transform: Transform) -> tuple[int, ...]:
        return (self.num_frames, *super()._pixel_shape(transform))  # [T, C, H, W]

    def _folder_dataset(self, items: list[CaptionItem], root: Path, transform: Transform) -> Dataset:
        return VideoCaptionDataset(items, root, transform, self.reader, self.samplers[False], self.seed, self.strict)


class TextShardDataModule(ShardDataModule):
    """Text-only corpora (P-Former stage 0) as shards: tars of ``KEY.txt`` members, or ``.txt`` / ``.jsonl`` files
    (one sample per line), alone or in a weighted mixture; yields :class:`~vlgen.interfaces.TextBatch`.

    Args:
        train_shards: tars, text files, patterns or a list of ``{shards, weight, name}``.
        val_shards: validation shards (read once, in order).
        text_field: the field of ``.jsonl`` records holding the sentence.
        min_words: sentences with fewer words are skipped (counted in ``num_skipped``).
        max_words: sentences with more words are skipped (null: no limit).
        batch_size: training sentences per batch per device.
        eval_batch_size: validation sentences per batch per device (default: ``batch_size``).
        num_workers: dataloader worker processes per device.
        skip_bad_samples: skip (log and count) missing shards and unusable lines; false raises on the first.
        seed: seeds the order of every epoch.
        shuffle_block: shuffle window in sentences.
        epoch_size: positions per training epoch (default: every source's sentences once).
        index_dir: where shard indexes are cached.
    """

    kind = "text"

    def __init__(
        self,
        train_shards: Shards | None = None,
        val_shards: Shards | None = None,
        text_field: str = "caption",
        min_words: int = 1,
        max_words: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        skip_bad_samples: bool = True,
        seed: int = 0,
        shuffle_block: int = 65536,
        epoch_size: int | None = None,
        index_dir: str | None = None,
    ) -> None:
        super().__init__(
            train_shards=train_shards, val_shards=val_shards, test_shards=None, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, pin_memory=False,
            skip_bad_samples=skip_bad_samples, seed=seed, shuffle_block=shuffle_block, epoch_size=epoch_size,
            index_dir=index_dir, generate=None,
        )  # fmt: skip
        self.text_field, self.min_words, self.max_words = text_field, min_words, max_words

    def _decoder(self, train: bool) -> TextDecoder:
        return TextDecoder(self.text_field, self.min_words, self.max_words, self.strict)

    def _collate(self, train: bool) -> Any:
        return collate_text
