"""Pieces every vlgen data module shares: tolerant annotation reading and a collate that drops bad samples.

A long run must not die on one broken record or file. Records that cannot be used (a bad JSON line, a missing
field, an empty caption) are skipped when read, logged with the file name and position, and counted; samples whose
file cannot be decoded come back from ``__getitem__`` as ``None`` and the collate function drops and counts them, so
the count travels with the batch (``num_skipped``) out of dataloader workers. ``strict=True`` raises instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlgen.errors import ConfigError

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A record or file that cannot be used; raised only when bad samples are not skipped."""


def require_file(path: str | Path, option: str) -> Path:
    """``path`` as a Path, or a one-line error naming the option when it does not exist."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option}: {p} does not exist")
    return p


def read_records(path: Path, strict: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON list or a JSONL file, and how many entries were unreadable (skipped)."""
    bad = 0

    def reject(where: str, why: str) -> None:
        nonlocal bad
        if strict:
            raise BadSample(f"{path}:{where}: {why}")
        log.warning("skipping %s:%s: %s", path, where, why)
        bad += 1

    text = path.read_text(encoding="utf-8", errors="replace")
    entries: Iterator[tuple[str, Any]]
    if text.lstrip().startswith("["):
        try:
            entries = ((f"record {i}", r) for i, r in enumerate(json.loads(text)))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
    else:

        def lines() -> Iterator[tuple[str, Any]]:
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as err:
                    reject(f"line {n}", f"bad JSON ({err.msg})")

        entries = lines()
    records = []
    for where, record in entries:
        if not isinstance(record, dict):
            reject(where, "not a JSON object")
            continue
        record["_where"] = where
        records.append(record)
    return records, bad


def clean_captions(value: Any) -> list[str]:
    """A caption field (a string or a list of strings) as a list of non-empty stripped strings."""
    items = value if isinstance(value, list) else [value]
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


class SkipCounter:
    """Logs each bad file once and raises instead when ``strict``."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._seen: set[str] = set()

    def __call__(self, name: str, why: str) -> None:
        if self.strict:
            raise BadSample(f"{name}: {why}")
        if name not in self._seen:
            self._seen.add(name)
            log.warning("skipping unreadable sample %s: %s", name, why)


def collate_dropping_bad(samples: list[dict[str, Any] | None], tensor_keys: tuple[str, ...]) -> dict[str, Any]:
    """Stack ``tensor_keys`` and list the other fields of the good samples; ``num_skipped`` counts the ``None``s."""
    good = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"num_skipped": len(samples) - len(good)}
    if not good:
        return {**{k: torch.empty(0) for k in tensor_keys}, "captions": [], "references": [], "ids": [], **batch}
    for key in good[0]:
        values = [s[key] for s in good]
        batch[key] = torch.stack(values) if key in tensor_keys else values  # [B, ...]
    return batch


def make_collate(tensor_keys: tuple[str, ...]) -> Callable[[list[Any]], dict[str, Any]]:
    """A picklable collate function (dataloader workers may be spawned) for the given tensor fields."""
    return partial(collate_dropping_bad, tensor_keys=tensor_keys)
