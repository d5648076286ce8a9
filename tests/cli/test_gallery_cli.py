"""`vlgen test` writes gallery.html beside metrics.json: one row per test sample with its picture inside the page, the
per-caption CIDEr-D averaging to the run's CIDEr, and the page working from disk in headless Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen
from gallery_browser import check_in_browser, chromium_binary, rows

TINY = REPO / "configs" / "tiny" / "linear.yaml"


@pytest.fixture(scope="module")
def gallery_run(tmp_path_factory):
    """A test of the tiny config's untrained bridge (no checkpoint needed for a gallery) on a small world, with a
    quickly pre-trained tiny encoder and LM; the run directory and the command's stderr."""
    work = tmp_path_factory.mktemp("gallery")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    override = {
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(work, world)},
                "llm": {"init_args": tiny_lm(work, world, steps=30)},
            }
        },
        "data": {"init_args": {"root": str(work / "shapes"), "generate": world, "batch_size": 16, "num_workers": 0}},
    }
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    proc = vlgen("test", "--config", str(TINY), "--config", str(work / "override.yaml"), cwd=work)
    return run_dirs(work)[-1], proc.stderr


@pytest.mark.slow
def test_test_writes_a_gallery_of_every_sample(gallery_run):
    run, stderr = gallery_run
    page = (run / "gallery.html").read_text()
    assert f"gallery: {run.relative_to(run.parents[2]) / 'gallery.html'}" in stderr  # runs/vlgen/version_N/...
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert rows(page) == [p["id"] for p in predictions] and len(predictions) == WORLD["num_test"]
    assert page.count('src="data:image/jpeg;base64,') == WORLD["num_test"]
    scores = [float(s) for s in re.findall(r'data-score="([^"]*)"', page)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.mean(scores) == pytest.approx(metrics["CIDEr"], rel=1e-9)  # the column adds up to the run's CIDEr-D
    assert f'<span class="key">CIDEr</span> <span class="value">{metrics["CIDEr"]:.4g}</span>' in page


@pytest.mark.slow
def test_the_runs_gallery_works_in_headless_chromium(gallery_run, tmp_path):
    chromium_binary()
    check_in_browser(gallery_run[0] / "gallery.html", tmp_path)
