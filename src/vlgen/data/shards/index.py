"""Byte-offset indexes of tar shards (and line-per-sample text files), built once and cached.

A shard is read by random access: its index lists, per sample, the byte offset and size of each member
(``KEY.jpg``, ``KEY.txt``, ``KEY.json``...), grouped by key as WebDataset groups them (the key is the member path up to
the first dot of its file name). Random access is what lets an epoch visit samples in an order fixed by the seed
alone, split over any number of ranks and workers, and resume at any position without re-reading what came before.

An index is built by reading only the tar headers of a local file (seeking over the data), or by streaming a remote
one once; it is cached as ``INDEX_DIR/<hash of URL and kind>.idx`` with the shard's size and modification time and
rebuilt when they change. Its first line is a small header (sample count, bad samples), so a run over 100k shards
learns the epoch's size without loading every sample list. Samples that cannot be used for the kind of data asked for
(no image, no caption) are left out of the index and listed in it by key and reason; a truncated tail keeps the
complete members before it and records the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from vlgen.data.shards.urls import is_remote, local_path

VERSION = 1
Kind = Literal["image", "video", "text"]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv", "mov", "m4v")
TEXT_FILE_SUFFIXES = (".txt", ".jsonl")  # a plain text file is a shard whose lines are the samples
MEDIA_EXTS: dict[str, tuple[str, ...]] = {"image": IMAGE_EXTS, "video": VIDEO_EXTS, "text": ()}
Members = dict[str, tuple[int, int]]  # extension -> (byte offset, size)


def default_index_dir() -> str:
    return os.path.join(os.environ.get("VLGEN_CACHE", os.path.expanduser("~/.cache/vlgen")), "shard-index")


def open_url(url: str) -> BinaryIO:
    """A binary file object for a local path or, through fsspec, a remote URL."""
    if not is_remote(url):
        return open(local_path(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def stamp(url: str) -> list[Any]:
    """What identifies a shard's version: size and modification time (remote: size and ETag / mtime if any)."""
    if not is_remote(url):
        st = os.stat(local_path(url))
        return [st.st_size, st.st_mtime_ns]
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return [info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")]


def split_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); ``a.seg.txt`` -> (``a``, ``seg.txt``)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


@dataclass
class ShardIndex:
    """The usable samples of one shard for one kind of data.

    Attributes:
        url: the shard.
        kind: ``image``, ``video`` or ``text``.
        samples: ``(key, members)`` per usable sample, in shard order.
        bad: ``(key, reason)`` per sample left out.
        tail_error: why reading stopped before the end of the file (a truncated tar), or None.
    """

    url: str
    kind: Kind
    samples: list[tuple[str, Members]] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    tail_error: str | None = None

    def header(self, version_stamp: list[Any]) -> dict[str, Any]:
        return {
            "version": VERSION, "url": self.url, "kind": self.kind, "stamp": version_stamp,
            "num_samples": len(self.samples), "bad": self.bad, "tail_error": self.tail_error,
        }  # fmt: skip


def is_text_file(url: str) -> bool:
    return url.lower().endswith(TEXT_FILE_SUFFIXES)


def scan(url: str, kind: Kind) -> ShardIndex:
    """Build the index of ``url`` by reading it (tar headers, or the lines of a text file)."""
    index = ShardIndex(url, kind)
    if is_text_file(url):
        if kind != "text":
            raise ValueError(f"{url}: a text file holds no {kind} samples")
        _scan_lines(url, index)
        return index
    grouped: dict[str, Members] = {}
    with open_url(url) as f:
        size = os.fstat(f.fileno()).st_size if not is_remote(url) else None
        try:
            for info in _members(f, remote=is_remote(url)):
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if size is not None and info.offset_data + info.size > size:
                    index.tail_error = f"member {info.name} is cut off at byte {size}"
                    break
                grouped.setdefault(key, {})[ext] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as err:
            index.tail_error = f"{type(err).__name__}: {err}"
    if index.tail_error and grouped:  # the last sample may have lost members past the cut
        index.bad.append((next(reversed(grouped)), f"at the cut-off end of the shard ({index.tail_error})"))
        grouped.pop(next(reversed(grouped)))
    for key, members in grouped.items():
        why = usable(members, kind)
        if why is None:
            index.samples.append((key, members))
        else:
            index.bad.append((key, why))
    return index


def _members(f: BinaryIO, remote: bool) -> Iterator[tarfile.TarInfo]:
    # a local file is read by seeking from header to header; a remote one is streamed once
    with tarfile.open(fileobj=f, mode="r|" if remote else "r:") as tar:
        while (info := tar.next()) is not None:
            yield info


def _scan_lines(url: str, index: ShardIndex) -> None:
    ext = "jsonl" if url.lower().endswith(".jsonl") else "txt"
    offset = 0
    with open_url(url) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                index.samples.append((f"line {n}", {ext: (offset, len(line))}))
            offset += len(line)


def usable(members: Members, kind: Kind) -> str | None:
    """Why a sample with these members cannot be used for ``kind`` (None: it can)."""
    if kind != "text" and not any(ext in members for ext in MEDIA_EXTS[kind]):
        return f"no {kind} member (has {', '.join(sorted(members)) or 'nothing'})"
    if "txt" not in members and "json" not in members:
        return "no caption (.txt or .json) member"
    return None


def media_ext(members: Members, kind: Kind) -> str:
    """The extension of the sample's image or video member (``txt`` for text)."""
    if kind == "text":
        return "txt" if "txt" in members else "jsonl"
    return next(ext for ext in MEDIA_EXTS[kind] if ext in members)


class IndexCache:
    """Finds, builds and loads shard indexes under ``root`` (``INDEX_DIR``); safe for concurrent builders."""

    def __init__(self, root: str | None = None) -> None:
        self.root = Path(root or default_index_dir())

    def path(self, url: str, kind: Kind) -> Path:
        absolute = url if is_remote(url) else os.path.abspath(local_path(url))
        digest = hashlib.sha1(f"{absolute}|{kind}".encode()).hexdigest()[:24]
        return self.root / f"{digest}.idx"

    def header(self, url: str, kind: Kind) -> dict[str, Any]:
        """The index header of ``url``, building the index when it is missing or stale.

        Raises:
            FileNotFoundError: the shard does not exist.
        """
        current = stamp(url)  # FileNotFoundError for a missing local shard
        path = self.path(url, kind)
        try:
            with path.open("rb") as f:
                head = json.loads(f.readline())
            if head.get("version") == VERSION and head.get("stamp") == current:
                return head
        except (OSError, ValueError):
            pass
        index = scan(url, kind)
        head = index.header(current)
        body = {"samples": [[key, {e: list(v) for e, v in members.items()}] for key, members in index.samples]}
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(head) + "\n" + json.dumps(body, separators=(",", ":")) + "\n")
        os.replace(tmp, path)  # atomic: concurrent builders write the same content
        return head

    def samples(self, url: str, kind: Kind) -> list[tuple[str, Members]]:
        """The usable samples of ``url`` (its index must have been built by :meth:`header`)."""
        with self.path(url, kind).open("rb") as f:
            f.readline()
            body = json.loads(f.readline())
        return [(key, {e: (v[0], v[1]) for e, v in members.items()}) for key, members in body["samples"]]
