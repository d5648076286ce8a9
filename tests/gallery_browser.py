"""Opening a ``gallery.html`` from disk in headless Chromium, for the gallery tests (unit and end to end).

A test that needs the browser calls :func:`chromium_binary` first: without one it is skipped, saying how to install
it. The page's own script reports what the browser did: ``data-sorted`` (the order it applied from the address's
``#sort=...``) and ``data-images-loaded`` (thumbnails with ``naturalWidth > 0``) on ``<body>``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str:
    """The first Chromium found on ``PATH``; skips the calling test when there is none."""
    found = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return found


def chromium(page: Path, fragment: str, profile: Path, *args: str) -> str:
    """Open ``page`` (with ``fragment``, e.g. ``#sort=score-desc``) from disk in headless Chromium with ``args``,
    in its own profile directory (parallel runs do not share one); its stdout."""
    command = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += ["--hide-scrollbars"]
    command += [f"--user-data-dir={profile}", "--no-first-run", "--virtual-time-budget=5000", *args]
    proc = subprocess.run([*command, page.as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def rows(page: str) -> list[str]:
    """The sample ids of a gallery page's rows, in the order it lists them."""
    return re.findall(r'<tr data-id="([^"]*)"', page)


def shown_order(dom: str) -> tuple[list[str], list[float | None]]:
    """The rows' ids and scores (``None``: unscored) in the order a dumped DOM shows them."""
    found = re.findall(r'<tr data-id="([^"]*)" data-score="([^"]*)"', dom)
    return [i for i, _ in found], [float(s) if s else None for _, s in found]


def natural_key(text: str) -> list[int | str]:
    """``img_9`` before ``img_10``, as the page's ``localeCompare(..., {numeric: true})`` sorts ids."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def check_in_browser(page: Path, work: Path, screenshot: Path | None = None) -> Path:
    """Open ``page`` in Chromium and check it: ``#sort=score-desc`` orders the rows by descending score (unscored
    last), ``#sort=id-asc`` by id, every thumbnail decoded, and a 1000x700 screenshot shows text and pictures (no
    blank page). Returns the screenshot's path (``screenshot``, or one in ``work``)."""
    count = len(rows(page.read_text()))
    dom = chromium(page, "#sort=score-desc", work / "profile", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None
    assert 'data-sorted="score-desc"' in body.group(0)
    assert f'data-images-loaded="{count}"' in body.group(0)  # every thumbnail decoded (naturalWidth > 0)
    ids, scores = shown_order(dom)
    known = [s for s in scores if s is not None]
    assert len(ids) == count and known == sorted(known, reverse=True)
    assert scores[len(known) :] == [None] * (count - len(known))  # unscored rows last

    ids_up, _ = shown_order(chromium(page, "#sort=id-asc", work / "profile", "--dump-dom"))
    assert ids_up == sorted(ids, key=natural_key)

    screenshot = screenshot or work / "gallery.png"
    chromium(page, "#sort=score-desc", work / "profile", f"--screenshot={screenshot}", "--window-size=1000,700")
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(float)
    assert image.shape == (700, 1000, 3)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # text and pictures, not blank
    return screenshot
