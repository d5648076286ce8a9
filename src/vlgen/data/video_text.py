"""Video-caption data (MSR-VTT, MSVD): annotation files plus a video folder, as a LightningDataModule.

Annotation files are a JSON list or JSONL of records with ``video`` (path relative to the video root), ``caption`` (a
string or a list) and an optional ``video_id`` (default: the video path). Training yields one sample per (video,
caption) pair; validation, test and predict-from-test yield one sample per video with all of its captions as
references (records are grouped by ``video_id``), exactly as the image module does (the shared logic lives in
:mod:`vlgen.data.captions`). Each sample decodes only ``num_frames`` frames (:mod:`vlgen.data.video_io`), chosen by
``train_sampling`` or ``eval_sampling``, and passes each frame through the model's per-frame ``image_transform(train)``
with the same random draws for every frame of a clip (one crop, one flip per clip): pixels ``[T, C, H, W]``, batches
``[B, T, C, H, W]``. Unreadable, missing, empty or too short videos come back as ``None`` and are counted per batch.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from vlgen.data.captions import CaptionDataModule, CaptionItem, Transform, caption_sample
from vlgen.data.common import BadFiles, CaptionSample, seeded_transform
from vlgen.data.synthetic.motion import MovingShapesWorld
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
from vlgen.data.vqa import VQATask


def transform_clip(frames: np.ndarray, transform: Transform, seed: int) -> Tensor:
    """Every frame of uint8 ``[T, H, W, 3]`` through ``transform`` with the same random draws -> ``[T, C, H, W]``.

    Each frame is transformed with the generators seeded alike (:func:`seeded_transform`), so a random crop or flip
    is the same for the whole clip.
    """
    return torch.stack([seeded_transform(transform, Image.fromarray(f), seed) for f in frames])  # [T, C, H, W]


class VideoCaptionDataset(Dataset):
    """Samples, decodes and transforms the frames of each video; an unusable video comes back as ``None``.

    Training reads samples through :meth:`seeded_item` (the module's loader, :mod:`vlgen.data.resume`): the frame
    choices and the clip's augmentation come from the sample's own seed, a function of the data seed, the epoch and
    the sample's position in it, so they are the same in any worker, with any ``num_workers``, and in a resumed run.
    Indexing the dataset directly (``dataset[i]``, the evaluation loaders) draws from a generator per process, seeded
    by ``seed`` and by torch's seed for that process: each dataloader worker draws differently, each pass continues
    the stream, and a run seeded with ``seed_everything`` repeats itself.

    Args:
        items: the samples.
        video_root: directory the items' video paths are relative to.
        transform: PIL RGB frame -> tensor ``[C, H, W]``.
        reader: decodes the chosen frames.
        sampler: chooses the frames of each video and refuses empty or too short ones.
        seed: mixed into the frame-sampling randomness.
        strict: raise on an unusable video instead of skipping it.
    """

    def __init__(
        self,
        items: list[CaptionItem],
        video_root: Path,
        transform: Transform,
        reader: FrameReader,
        sampler: FrameSampler,
        seed: int,
        strict: bool,
    ) -> None:
        self.items, self.video_root, self.transform = items, video_root, transform
        self.reader, self.sampler, self.seed = reader, sampler, seed
        self.bad_files = BadFiles(strict)
        self._rng: random.Random | None = None
        self._rng_key: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def rng(self) -> random.Random:
        """This process's generator (made afresh in each worker, whose torch seed differs per worker)."""
        info = get_worker_info()
        key = info.seed if info is not None else torch.initial_seed()
        if self._rng is None or key != self._rng_key:
            self._rng, self._rng_key = random.Random(f"{self.seed}:{key}"), key
        return self._rng

    def __getitem__(self, index: int) -> CaptionSample | None:
        return self.load(index, self.rng())

    def seeded_item(self, index: int, seed: int) -> CaptionSample | None:
        """Sample ``index`` with its frames and augmentation drawn from ``seed`` alone."""
        return self.load(index, random.Random(seed))

    def load(self, index: int, rng: random.Random) -> CaptionSample | None:
        """Sample ``index``, its frames chosen and its clip augmented with draws from ``rng``."""
        item = self.items[index]
        path = self.video_root / item.path
        try:
            frames = self.reader.read(path, lambda count: self.sampler(count, rng))  # [T, H, W, 3] uint8
        except (OSError, VideoError) as err:
            self.bad_files(str(path), err)
            return None
        pixels = transform_clip(frames, self.transform, rng.getrandbits(32))  # [T, C, H, W]
        return caption_sample(item, pixels)


class VideoTextDataModule(CaptionDataModule):
    """MSR-VTT / MSVD-style video-caption splits from one root.

    Args:
        root: directory holding the annotation files (and the videos unless ``video_root`` is given).
        train_file: training annotations, relative to ``root`` (null: no training split).
        val_file: validation annotations (null: no validation).
        test_file: test annotations.
        video_root: directory the video paths of the annotations are relative to (default: ``root``).
        predict_dir: a folder of videos (.mp4 .avi .mkv .webm .mov .m4v) to caption with ``vlgen predict``
            (default: the test split; ``pkg:NAME/SUBDIR`` as for images).
        num_frames: frames per clip.
        train_sampling: how training clips choose their frames: ``headtail`` (half from each half of the video, as
            EVLGen), ``random`` (one random frame per equal segment) or ``uniform`` (segment centres).
        eval_sampling: how validation, test and predict clips choose their frames (``uniform`` is deterministic).
        min_frames: videos with fewer decodable frames are skipped as too short (default: ``num_frames``); with
            fewer than ``num_frames`` but at least ``min_frames``, frames repeat.
        backend: the decoding library: ``decord`` (seeks to each frame) or ``pyav`` (decodes up to the last one).
        batch_size: training batch size per device.
        eval_batch_size: validation / test / predict batch size per device (default: ``batch_size``).
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster copies to the GPU.
        skip_bad_samples: skip (log and count) unusable records and videos; false raises on the first.
        image_size: frame side of the fallback transform, used only without a model that provides one.
        seed: seeds the training order and each training clip's frame choices and augmentation (by the clip's
            position in its epoch); evaluation clips mix it with each worker's torch seed.
        generate: a synthetic video world to write into ``root`` when it is not there yet.
        prompt_field: the record field holding each sample's own text for the model to read before the caption
            (a question, an instruction); evaluation then keeps one sample per (media, text). None: captions only.
        task: visual question answering instead of captions (:class:`~vlgen.data.VQATask`): the split files are
            VQAv2 / OK-VQA, GQA or LAVIS question files, one sample per question, scored by the task's metric.
    """

    media_field = "video"
    media_suffixes = VIDEO_SUFFIXES

    def __init__(
        self,
        root: str,
        train_file: str | None = "train.json",
        val_file: str | None = "val.json",
        test_file: str | None = "test.json",
        video_root: str | None = None,
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
        image_size: int = 224,
        seed: int = 0,
        generate: MovingShapesWorld | None = None,
        prompt_field: str | None = None,
        task: VQATask | None = None,
    ) -> None:
        self.samplers = frame_samplers(num_frames, train_sampling, eval_sampling, min_frames)  # by train
        self.reader = make_reader(backend)  # before any path check: a missing library is the first thing to fix
        super().__init__(
            root=root,
            files={"train": train_file, "val": val_file, "test": test_file},
            media_root=video_root,
            predict_dir=predict_dir,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            skip_bad_samples=skip_bad_samples,
            image_size=image_size,
            generate=generate,
            prompt_field=prompt_field,
            task=task,
        )
        self.video_root = self.media_root
        self.num_frames, self.backend, self.seed = num_frames, backend, seed

    def _dataset(self, items: list[CaptionItem], media_root: Path, transform: Transform, train: bool) -> Dataset:
        sampler = self.samplers[train]
        return VideoCaptionDataset(items, media_root, transform, self.reader, sampler, self.seed, self.strict)

    def _pixel_shape(self, transform: Transform) -> tuple[int, ...]:
        return (self.num_frames, *super()._pixel_shape(transform))  # [T, C, H, W]

    def summary(self) -> str:
        """One line for logs: samples per split, bad records skipped, and how frames are read."""
        train, val = self.samplers[True].mode, self.samplers[False].mode
        return f"{super().summary()}; {self.num_frames} frames ({train} / {val} sampling, {self.backend})"
