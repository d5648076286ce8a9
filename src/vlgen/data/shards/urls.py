"""Shard lists as users write them: brace patterns, globs, explicit lists; local paths or fsspec URLs.

``data/cc3m/{00000..00331}.tar`` expands numerically with the width of its first bound (as img2dataset names its
shards); ``{a,b}`` lists alternatives; ``*``/``?`` globs match local files, sorted. A remote URL (``s3://``, ``gs://``,
``https://``) is opened with fsspec (installed with Lightning; S3 and GCS need ``s3fs`` / ``gcsfs``) by the same code
that opens local paths: the index is built by streaming the tar once, samples are then read by byte range.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from vlgen.errors import ConfigError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def is_remote(url: str) -> bool:
    """True for ``scheme://...`` URLs other than ``file://``."""
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern stands for, in order: ``{000..002}`` -> 000, 001, 002; ``{a,b}`` -> a, b."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    bounds = _RANGE.match(body)
    if bounds:
        lo, hi = int(bounds.group(1)), int(bounds.group(2))
        width = len(bounds.group(1).lstrip("-"))
        step = 1 if hi >= lo else -1
        options = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_shards(spec: str | list[str], option: str) -> list[str]:
    """Shard URLs of ``spec`` (a pattern or a list of patterns), each once, in the given order.

    Braces expand without looking at the disk, so a shard missing from a range is kept here and skipped (named and
    counted) when read; a local glob that matches nothing, or an empty list, stops with one line naming ``option``.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: dict[str, None] = {}
    for pattern in patterns:
        for url in expand_braces(pattern):
            if not is_remote(url) and any(c in url for c in "*?["):
                found = sorted(p for p in glob.glob(local_path(url), recursive=True) if Path(p).is_file())
                if not found:
                    raise FileNotFoundError(f"{option}: {url} matches no file")
                urls.update(dict.fromkeys(found))
            else:
                urls[url] = None
    if not urls:
        raise ConfigError(f"{option}: no shards given")
    return list(urls)
