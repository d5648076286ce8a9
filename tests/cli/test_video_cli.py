"""Video captioning through the `vlgen` command: the tiny video config fits on synthetic clips it writes itself,
trains the temporal modules and the bridge only, tests, and captions a folder of videos."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

CONFIG = REPO / "configs" / "tiny" / "video_evlgen.yaml"
VIDEOS = {"seed": 0, "num_train": 24, "num_val": 8, "num_test": 8, "num_text": 600}  # a small moving-shapes world


@pytest.mark.slow
def test_tiny_video_config_fits_tests_and_captions_a_folder(tmp_path, tiny_bert_dir):
    shapes = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    videos = {"class_path": "vlgen.data.synthetic.MovingShapesWorld", "init_args": VIDEOS}
    override = {
        "trainer": {"max_steps": 6, "limit_val_batches": 1, "log_every_n_steps": 1},
        "model": {
            "init_args": {
                "encoder": {"init_args": {"image": {"init_args": tiny_encoder(tmp_path, shapes)}}},
                "bridge": {"init_args": {"bert": str(tiny_bert_dir)}},
                "llm": {"init_args": tiny_lm(tmp_path, videos, steps=20)},
            }
        },
        "data": {"init_args": {"root": str(tmp_path / "shapes"), "generate": videos, "batch_size": 8}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    args = ["--config", str(CONFIG), "--config", str(tmp_path / "override.yaml"), "--data.init_args.num_workers", "0"]
    proc = vlgen("fit", *args, cwd=tmp_path)
    assert "4 frames (headtail / uniform sampling, decord)" in proc.stderr
    assert "temporal contextualizer: 3 blocks of ResNet" in proc.stderr
    run = run_dirs(tmp_path)[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    gates = {k: v for k, v in state.items() if k.endswith(".temporal.gate")}
    assert len(gates) == 3 and all(v.abs() > 0 for v in gates.values())  # trained away from the image model
    assert any(k.startswith("bridge.") for k in state)
    assert not any(k.startswith("llm.") or (k.startswith("encoder.") and ".temporal." not in k) for k in state)

    vlgen("test", *args, "--ckpt_path", str(ckpt), cwd=tmp_path)
    scores = json.loads((run_dirs(tmp_path)[-1] / "metrics.json").read_text())
    assert {"CIDEr", "Bleu_4"} <= set(scores)

    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("test_000000.mp4", "test_000001.mp4"):
        shutil.copy(tmp_path / "shapes" / "videos" / name, folder / name)
    (folder / "broken.mp4").write_bytes(b"not a video")
    proc = vlgen("predict", *args, "--ckpt_path", str(ckpt), "--data.predict_dir", str(folder), cwd=tmp_path)
    assert "broken.mp4" in proc.stderr  # skipped and named, not fatal
    rows = [json.loads(line) for line in open(run_dirs(tmp_path)[-1] / "predictions.jsonl")]
    assert sorted(r["id"] for r in rows) == ["test_000000.mp4", "test_000001.mp4"]
    assert all(isinstance(r["caption"], str) for r in rows)
