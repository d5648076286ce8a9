"""Pieces every vlgen data module shares: tolerant annotation reading and a collate that drops bad samples.

A long run must not die on one broken record or file. Records that cannot be used (a bad JSON line, a missing
field, an empty caption) are skipped when read, logged with the file name and position, and counted
(:class:`BadRecords`); samples whose file cannot be decoded come back from ``__getitem__`` as ``None``
(:class:`BadFiles` logs each file once) and the collate function drops and counts them, so the count travels with the
batch (``num_skipped``) out of dataloader workers. With ``strict=True`` both raise :class:`BadSample` instead.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlgen.errors import ConfigError
from vlgen.interfaces import CaptionBatch

log = logging.getLogger(__name__)
MAX_WARNINGS = 20  # per annotation file; further bad records are only counted
T = TypeVar("T")


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
    goes to ``bad`` with its line or record number. The text is read by :func:`read_text`: in a file that is not
    valid UTF-8, each line (JSONL) or record (JSON) holding undecodable bytes goes to ``bad`` too, naming the encoding
    problem, and is skipped; the others are read exactly (no character is replaced).
    """
    text, damaged = read_text(path)
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
        if not isinstance(record, dict):
            bad(where, "not a JSON object")
        elif damaged and (byte := _undecodable(record)) is not None:
            bad(where, _not_utf8(byte))
        else:
            yield where, record


def read_text(path: Path) -> tuple[str, bool]:
    """The text of an annotation file and whether it had bytes that are not UTF-8.

    UTF-8 (a byte-order mark is dropped), or UTF-16 / UTF-32 when the file starts with their byte-order mark. Bytes
    of a file that is not valid UTF-8 come back as lone surrogates (``surrogateescape``): never mistaken for text, and
    found again by the caller, which skips what holds them (a Latin-1 "café" is never silently read as "caf" + U+FFFD).
    """
    raw = path.read_bytes()
    for codec, boms in _WIDE_BOMS:  # UTF-32 first: its little-endian mark starts like UTF-16's
        if raw.startswith(boms):
            try:
                return raw.decode(codec), False
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}: not valid {codec} ({err.reason}); re-encode it as UTF-8") from None
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="surrogateescape"), True


_WIDE_BOMS = (
    ("UTF-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),
    ("UTF-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)),
)
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of the bytes 0x80-0xff


def _undecodable(value: Any) -> int | None:
    """The first byte that was not UTF-8 in a decoded string or in the keys and values of a JSON value, if any."""
    if isinstance(value, str):
        found = _UNDECODABLE.search(value)
        return None if found is None else ord(found.group()) - 0xDC00
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        for item in value:
            if (byte := _undecodable(item)) is not None:
                return byte
    return None


def _not_utf8(byte: int) -> str:
    return f"not valid UTF-8 (byte 0x{byte:02x}); re-encode the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"


def _jsonl(text: str, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if (byte := _undecodable(line)) is not None:  # only a file that is not UTF-8 has these
            bad(f"line {n}", _not_utf8(byte))
        elif line.strip():
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


def seeded_transform(transform: Callable[[Any], T], image: Any, seed: int) -> T:
    """``transform(image)`` with Python's and torch's global generators seeded by ``seed`` for the call and restored
    afterwards: a random augmentation that depends only on ``seed``, never on what ran before."""
    state, cpu = random.getstate(), torch.get_rng_state()
    try:
        random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed also seeds CUDA, slowly)
        return transform(image)
    finally:
        random.setstate(state)
        torch.set_rng_state(cpu)


def drop_bad(samples: Sequence[T | None]) -> tuple[list[T], int]:
    """The good samples and how many were ``None``."""
    good = [s for s in samples if s is not None]
    return good, len(samples) - len(good)


class _SampleText(TypedDict, total=False):
    prompt: str
    targets: list[str]
    target_weights: list[float]
    answer_type: str
    question_type: str


class CaptionSample(_SampleText):
    """One item of an image- or video-caption dataset, before collation into a :class:`CaptionBatch`; the optional
    keys (``prompt``, weighted ``targets``, VQA types) become the batch's plural ones when every sample has them."""

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
        batch = CaptionBatch(
            pixels=pixels,
            captions=[s["caption"] for s in good],
            references=[s["references"] for s in good],
            ids=[s["id"] for s in good],
            num_skipped=skipped,
        )
        for key, plural in _OPTIONAL_KEYS:  # a dataset with per-sample text gives it for every sample
            if good and all(key in s for s in good):
                batch[plural] = [s[key] for s in good]  # type: ignore[literal-required]
        return batch


_OPTIONAL_KEYS = (
    ("prompt", "prompts"),
    ("targets", "targets"),
    ("target_weights", "target_weights"),
    ("answer_type", "answer_types"),
    ("question_type", "question_types"),
)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool, collate: Callable
) -> DataLoader:
    """A DataLoader as every vlgen data module builds it (Lightning adds a DistributedSampler under DDP).

    An unshuffled (evaluation) loader gets a generator of its own, so starting it draws nothing from torch's global
    generator: validating never shifts the dropout masks of the training steps after it, and a resumed run, which
    may validate at other points, keeps drawing what an uninterrupted one draws. (The training loaders of the map-style
    modules are :class:`vlgen.data.resume.ResumableLoader` s.)
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate,
        generator=None if shuffle else torch.Generator().manual_seed(0),
    )
