"""Building small image shards with known, unique sample keys for the shard tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from vlgen.data.shards.write import ShardWriter


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(buf, "PNG")
    return buf.getvalue()


def write_image_shards(out: Path, sizes: list[int], prefix: str = "s") -> list[Path]:
    """One tar per entry of ``sizes`` with that many samples; sample ids ``{prefix}{n}`` are unique over all shards."""
    paths, n = [], 0
    for shard, size in enumerate(sizes):
        with ShardWriter(out / f"tmp{shard}", samples_per_shard=10**9) as writer:
            for _ in range(size):
                meta = {"id": f"{prefix}{n}", "captions": [f"caption {n}"]}
                members = {"png": png(n), "txt": f"caption {n}".encode(), "json": json.dumps(meta).encode()}
                writer.write(f"{n:06d}", members)
                n += 1
        target = out / f"{shard:05d}.tar"
        (out / f"tmp{shard}" / "00000.tar").rename(target)
        paths.append(target)
    return paths
