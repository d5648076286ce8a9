"""Video captioning through the `vlgen` command, as shipped: configs/tiny/video_evlgen.yaml from an empty directory
writes its synthetic clips, fits (temporal modules and connector only), tests above a measured floor, and captions a
folder of videos, skipping a broken one."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from cli_helpers import REPO, model_and_best_constant_cider, run_dirs, vlgen

CONFIG = str(REPO / "configs" / "tiny" / "video_evlgen.yaml")


@pytest.mark.slow
def test_tiny_video_config_fits_tests_and_captions_a_folder(tmp_path):
    """The floor is relative, as for images: the best of the test clips' own canonical captions said for every clip.
    Measured (Python PTB tokenizer): that bar 0.913, the model 1.340 (1.47x); with the Java tokenizer the model
    scores 1.332 and the image model on the middle frame 1.176 (bench/video_motion.py). The assertion asks for
    1.3x. The whole fit, from nothing on disk, took 161 s here."""
    start = time.perf_counter()
    proc = vlgen("fit", "--config", CONFIG, "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    print(f"fit from an empty directory: {time.perf_counter() - start:.0f} s")
    assert "4 frames (headtail / uniform sampling, decord)" in proc.stderr
    assert "temporal contextualizer: 3 blocks of ResNet" in proc.stderr
    ckpt = run_dirs(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    gates = {k: v for k, v in state.items() if k.endswith(".temporal.gate")}
    assert len(gates) == 3 and all(v.abs() > 0 for v in gates.values())  # trained away from the image model
    assert any(k.startswith("bridge.") for k in state)
    assert not any(k.startswith("llm.") or (k.startswith("encoder.") and ".temporal." not in k) for k in state)

    vlgen("test", "--config", CONFIG, "--ckpt_path", str(ckpt), cwd=tmp_path)
    model, constant = model_and_best_constant_cider(run_dirs(tmp_path)[-1], count=128)
    assert model > 1.3 * constant

    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("test_000000.mp4", "test_000001.mp4"):
        shutil.copy(tmp_path / "data" / "shapes-video" / "videos" / name, folder / name)
    (folder / "broken.mp4").write_bytes(b"not a video")
    proc = vlgen(
        "predict", "--config", CONFIG, "--ckpt_path", str(ckpt), "--data.predict_dir", str(folder), cwd=tmp_path
    )
    assert "broken.mp4" in proc.stderr  # skipped and named, not fatal
    rows = [json.loads(line) for line in open(run_dirs(tmp_path)[-1] / "predictions.jsonl")]
    assert sorted(r["id"] for r in rows) == ["test_000000.mp4", "test_000001.mp4"]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in rows)
