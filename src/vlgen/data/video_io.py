"""Choosing which frames of a video to use, and decoding only those frames.

:func:`sample_indices` picks ``num_frames`` frame indices of a video: ``uniform`` takes the centre frame of each of
``num_frames`` equal segments (deterministic, for evaluation), ``random`` one random frame of each segment (TSN-style
training), ``headtail`` half of the frames from the first half of the video and the rest from the second half, each
half's frames distinct (how EVLGen samples training clips). :class:`FrameSampler` adds the checks a data module
needs: a video without frames, or with fewer than ``min_frames``, raises :class:`VideoError`.

A :class:`FrameReader` opens a video once, learns its frame count, asks a callback which frames it wants and decodes
only those: :class:`DecordReader` seeks (``decord.VideoReader.get_batch``), :class:`PyAVReader` decodes sequentially
up to the last wanted frame and keeps the wanted ones. Both return uint8 RGB ``[T, H, W, 3]`` and turn decoder
errors into :class:`VideoError`. ``decord`` and ``av`` are imported only when a reader is made, and a missing package
raises one line naming the extra to install.
"""

from __future__ import annotations

import importlib
import io
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO, ClassVar, Literal

import numpy as np

from vlgen.errors import ConfigError

Sampling = Literal["uniform", "random", "headtail"]
Backend = Literal["decord", "pyav"]
SAMPLING_MODES: tuple[Sampling, ...] = ("uniform", "random", "headtail")
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"})
Chooser = Callable[[int], Sequence[int]]  # frame count -> the frame indices to decode


class VideoError(Exception):
    """A video that cannot be used: not decodable, without frames, or too short."""


def sample_indices(num_available: int, num_frames: int, mode: Sampling, rng: random.Random | None = None) -> list[int]:
    """``num_frames`` sorted frame indices in ``[0, num_available)``.

    Args:
        num_available: frames in the video (at least 1).
        num_frames: frames wanted (at least 1). With fewer available, indices repeat (still sorted); whether such a
            video is used at all is the caller's decision.
        mode: ``uniform`` (centre of each equal segment), ``random`` (a random frame of each equal segment) or
            ``headtail`` (``num_frames // 2`` distinct frames of the first half, the rest of the second half; like
            ``random`` when a half has too few frames).
        rng: the randomness of ``random`` and ``headtail`` (default: a fresh unseeded generator).
    """
    n, k = num_available, num_frames
    if n < 1 or k < 1:
        raise ValueError(f"sample_indices: need at least one frame available ({n}) and wanted ({k})")
    if mode == "uniform":
        return [(2 * i + 1) * n // (2 * k) for i in range(k)]  # floor of segment i's centre (i + 1/2) * n / k
    rng = rng if rng is not None else random.Random()
    half, head = n // 2, k // 2
    if mode == "headtail" and half >= head and n - half >= k - head:
        return sorted(rng.sample(range(half), head)) + sorted(rng.sample(range(half, n), k - head))
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sample_indices: unknown mode {mode!r}, not one of {', '.join(SAMPLING_MODES)}")
    bounds = [i * n // k for i in range(k + 1)]  # segment i is [bounds[i], bounds[i + 1]), empty when n < k
    return [rng.randrange(lo, max(lo + 1, hi)) for lo, hi in itertools.pairwise(bounds)]


@dataclass(frozen=True)
class FrameSampler:
    """Frame indices for one video, refusing videos without frames or shorter than ``min_frames``.

    Args:
        num_frames: frames per clip.
        mode: see :func:`sample_indices`.
        min_frames: videos with fewer frames raise :class:`VideoError` (default: ``num_frames``).
    """

    num_frames: int
    mode: Sampling
    min_frames: int | None = None

    def __call__(self, num_available: int, rng: random.Random | None = None) -> list[int]:
        least = self.num_frames if self.min_frames is None else self.min_frames
        if num_available < 1:
            raise VideoError("no decodable frames")
        if num_available < least:
            raise VideoError(f"too short: {num_available} frames, fewer than min_frames={least}")
        return sample_indices(num_available, self.num_frames, self.mode, rng)


def frame_samplers(
    num_frames: int, train_sampling: Sampling, eval_sampling: Sampling, min_frames: int | None
) -> dict[bool, FrameSampler]:
    """The training (``True``) and evaluation (``False``) samplers of a video data module, its options checked: a
    bad value stops with one line naming the ``data.`` option."""
    if num_frames < 1 or (min_frames is not None and min_frames < 1):
        raise ConfigError(f"data.num_frames ({num_frames}) and data.min_frames ({min_frames}) must be >= 1")
    for option, mode in (("data.train_sampling", train_sampling), ("data.eval_sampling", eval_sampling)):
        if mode not in SAMPLING_MODES:
            raise ConfigError(f"{option}: {mode!r} is not one of {', '.join(SAMPLING_MODES)}")
    return {True: FrameSampler(num_frames, train_sampling, min_frames),
            False: FrameSampler(num_frames, eval_sampling, min_frames)}  # fmt: skip


def require_package(module: str, backend: str) -> ModuleType:
    """Import ``module`` or raise one line saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"the {backend} video backend needs the {module!r} package: pip install 'vlgen[video]'"
        ) from None


class FrameReader(ABC):
    """Decodes the chosen frames of a video file; subclasses implement :meth:`_read` for one library."""

    name: ClassVar[str]  # the backend's name in the config
    module: ClassVar[str]  # the library to import
    error_name: ClassVar[str]  # the library's exception class, an attribute of its module

    def __init__(self) -> None:
        require_package(self.module, self.name)  # fail when the reader is made, not in a dataloader worker

    def read(self, path: str | Path | BinaryIO, choose: Chooser) -> np.ndarray:
        """Open ``path`` (or a binary file object, e.g. a shard member in memory), call ``choose(frame_count)`` and
        return those frames as uint8 RGB ``[T, H, W, 3]``.

        Raises:
            FileNotFoundError: ``path`` is not a file.
            VideoError: the file cannot be decoded, or ``choose`` refused it.
        """
        if isinstance(path, (str, Path)) and not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")
        lib = require_package(self.module, self.name)
        try:
            return self._read(lib, path if not isinstance(path, (str, Path)) else str(path), choose)
        except (VideoError, FileNotFoundError):
            raise
        except (OSError, ValueError, IndexError, RuntimeError, getattr(lib, self.error_name)) as err:
            raise VideoError(f"cannot decode with {self.name}: {type(err).__name__}: {err}") from err

    @abstractmethod
    def _read(self, lib: ModuleType, path: str | BinaryIO, choose: Chooser) -> np.ndarray:
        """Decode the frames ``choose(frame_count)`` names from ``path`` with the imported library ``lib``."""


class DecordReader(FrameReader):
    """Reads frames with decord, one thread, seeking to each wanted frame (``get_batch``)."""

    name, module, error_name = "decord", "decord", "DECORDError"

    def _read(self, lib: ModuleType, path: str | BinaryIO, choose: Chooser) -> np.ndarray:
        video = lib.VideoReader(path, ctx=lib.cpu(0), num_threads=1)
        indices = list(choose(len(video)))
        return video.get_batch(indices).asnumpy()  # [T, H, W, 3] uint8


class PyAVReader(FrameReader):
    """Reads frames with PyAV, one thread: decodes from the start up to the last wanted frame, keeping the wanted ones.

    The frame count comes from the stream header, or, when the container does not record it, from counting the
    video packets (demuxing only, no decoding).
    """

    name, module, error_name = "pyav", "av", "FFmpegError"

    def _read(self, lib: ModuleType, path: str | BinaryIO, choose: Chooser) -> np.ndarray:
        with lib.open(path) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            count = stream.frames or self._count_packets(lib, path)
            indices = list(choose(count))
            wanted, last = set(indices), max(indices)
            frames: dict[int, np.ndarray] = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
                if i >= last:
                    break
        if len(frames) < len(wanted):
            raise VideoError(f"{count} frames announced, but frame {last} could not be decoded")
        return np.stack([frames[i] for i in indices])  # T x [H, W, 3] -> [T, H, W, 3]

    @staticmethod
    def _count_packets(lib: ModuleType, path: str | BinaryIO) -> int:
        if not isinstance(path, str):  # a second reader over the same bytes; the first is still decoding
            path = io.BytesIO(path.getvalue())  # type: ignore[attr-defined]
        with lib.open(path) as container:
            return sum(1 for packet in container.demux(video=0) if packet.size)  # the flush packet is empty


READERS: dict[str, type[FrameReader]] = {"decord": DecordReader, "pyav": PyAVReader}


def make_reader(backend: Backend) -> FrameReader:
    """The reader of ``backend`` (``decord`` or ``pyav``); its library must be installed."""
    if backend not in READERS:
        raise ConfigError(f"data.backend: {backend!r} is not one of {', '.join(READERS)}")
    return READERS[backend]()
