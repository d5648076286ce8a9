"""Writing shards in the layout img2dataset / video2dataset produce, from what vlgen already reads.

A shard is a plain tar of samples ``KEY.<media>`` + ``KEY.txt`` (the training caption) + ``KEY.json`` (``{"id",
"captions": [...]}``: every reference of an evaluation sample), written by :class:`ShardWriter`, which starts a new
``{n:05d}.tar`` every ``samples_per_shard`` samples and writes ``{n:05d}_stats.json`` beside each, as img2dataset does.
:func:`captions_to_shards` converts an annotation file plus a media folder (COCO / Karpathy JSON, MSR-VTT-style video
JSON): one sample per (media, caption) pair for training, one per media with all its captions for evaluation, as
the JSON data modules read them. :func:`text_to_shards` converts sentence files (``.txt`` lines, ``.jsonl`` records).
:class:`WorldShards` writes a synthetic world and its shards, so shard configs and tests run offline.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlgen.data.captions import caption_items
from vlgen.data.common import BadRecords, require_file
from vlgen.data.synthetic.motion import MovingShapesWorld
from vlgen.data.synthetic.world import SyntheticWorld

log = logging.getLogger(__name__)


class ShardWriter:
    """Writes samples into ``out_dir/{n:05d}.tar``, ``samples_per_shard`` per tar; use as a context manager."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir, self.per_shard = Path(out_dir), samples_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.count, self.shards = 0, []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``members`` maps an extension (``jpg``, ``txt``, ``json``) to its bytes."""
        if self._tar is None or self._in_shard == self.per_shard:
            self._close_shard()
            path = self.out_dir / f"{len(self.shards):05d}.tar"
            self.shards.append(path)
            self._tar, self._in_shard = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT), 0
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.count += 1

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            stats = {"count": self._in_shard, "successes": self._in_shard, "failed_to_download": 0}
            self.shards[-1].with_name(self.shards[-1].stem + "_stats.json").write_text(json.dumps(stats) + "\n")
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_shard()


def _progress(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with Lightning; without it, no bar
        return items
    return tqdm(items, total=total, desc=desc, unit="sample")


def captions_to_shards(
    annotations: str | Path,
    media_root: str | Path,
    out_dir: str | Path,
    field: str = "image",
    train: bool = True,
    samples_per_shard: int = 1000,
    strict: bool = False,
) -> ShardWriter:
    """Convert an annotation file + media folder into shards; unusable records and missing files are skipped.

    Args:
        annotations: JSON list / JSONL / COCO captions file (as :class:`~vlgen.data.ImageTextDataModule` reads).
        media_root: the folder the records' ``field`` paths are relative to.
        out_dir: where the ``.tar`` shards go.
        field: ``image`` or ``video``.
        train: one sample per (media, caption) pair; False: one per media with every caption as a reference.
        samples_per_shard: samples per tar.
        strict: raise on the first unusable record or missing file.
    """
    path = require_file(annotations, "annotations")
    bad = BadRecords(path, strict)
    items = caption_items(path, field, train, bad)
    missing = 0
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for n, item in enumerate(_progress(items, len(items), f"shards {Path(out_dir).name}")):
            media = Path(media_root) / item.path
            try:
                data = media.read_bytes()
            except OSError as err:
                if strict:
                    raise
                missing += 1
                log.warning("make-shards: skipping %s: %s", media, err)
                continue
            meta = {"id": item.id, "captions": list(item.captions), field: item.path}
            writer.write(
                f"{n:09d}",
                {
                    media.suffix.lower().lstrip("."): data,
                    "txt": item.captions[0].encode(),
                    "json": json.dumps(meta).encode(),
                },
            )
    log.info(
        "make-shards: %d samples in %d shards under %s; %d bad records, %d missing files skipped",
        writer.count, len(writer.shards), out_dir, bad.count, missing,
    )  # fmt: skip
    return writer


def text_to_shards(files: list[str | Path], out_dir: str | Path, text_field: str = "caption",
                   samples_per_shard: int = 10000) -> ShardWriter:  # fmt: skip
    """Sentences of ``.txt`` (one per line) and ``.jsonl`` (``text_field`` of each record) files -> ``KEY.txt``."""
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for file in files:
            path = require_file(file, "files")
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                text = line.strip()
                if path.suffix.lower() == ".jsonl" and text:
                    try:
                        value = json.loads(text).get(text_field)
                    except (json.JSONDecodeError, AttributeError):
                        value = None
                    text = value.strip() if isinstance(value, str) else ""
                if text:
                    writer.write(f"{writer.count:09d}", {"txt": text.encode()})
                else:
                    log.warning("make-shards: skipping %s line %d: no text", path, n)
    return writer


class WorldShards:
    """A synthetic world written to ``root`` (if not there) and converted to shards under ``out/{train,val,test}``.

    Args:
        world: a :class:`~vlgen.data.synthetic.ShapesWorld` or :class:`~vlgen.data.synthetic.MovingShapesWorld`.
        root: where the world's files go.
        out: where its shards go; ``out/done.json`` marks a complete conversion of this world.
        samples_per_shard: samples per tar (small, so the tiny configs have several shards).
    """

    def __init__(self, world: SyntheticWorld, root: str, out: str, samples_per_shard: int = 200) -> None:
        self.world, self.root, self.out, self.samples_per_shard = world, Path(root), Path(out), samples_per_shard

    def write(self) -> Path:
        marker = self.out / "done.json"
        expected = {"world": self.world.marker(), "samples_per_shard": self.samples_per_shard}
        if marker.is_file() and json.loads(marker.read_text()) == expected:
            return self.out
        self.world.write(self.root)
        field = "video" if isinstance(self.world, MovingShapesWorld) else "image"
        for split in ("train", "val", "test"):
            for old in (self.out / split).glob("*.tar"):
                old.unlink()
            ann = self.root / f"{split}.json"
            captions_to_shards(ann, self.root, self.out / split, field, split == "train", self.samples_per_shard)
        marker.write_text(json.dumps(expected))
        return self.out
