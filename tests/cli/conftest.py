"""Fixtures of the end-to-end tests of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL = {"seed": 0, "num_train": 24, "num_val": 8, "num_test": 8, "num_text": 400}  # 120 training pairs
MOVING = {**SMALL, "num_train": 12, "image_size": 32, "num_frames": 8, "questions_per_video": 0}  # 60 pairs
TRANSFORM = {"input_size": [3, 64, 64], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}  # parts/encoder.yaml


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """The two worlds, the tiny encoder and the two world LMs, built once in this process (quality does not matter).

    Not by a first run of the CLI: building draws from (and reseeds) the global generators, so a run that builds
    would start apart from the runs that load; and a CLI start costs more than the builds themselves.
    """
    from vlgen.data.synthetic import MovingShapesWorld, ShapesWorld
    from vlgen.data.synthetic.tiny_encoder import ShapesTinyEncoder
    from vlgen.data.synthetic.tiny_lm import ShapesTinyLM
    from vlgen.encoders import TimmEncoder

    out = tmp_path_factory.mktemp("built")
    shapes = ShapesWorld(**SMALL)
    ShapesTinyLM(shapes, str(out / "shapes"), steps=20).build(out / "lm")  # writes the world too
    ShapesTinyLM(MovingShapesWorld(**MOVING), str(out / "video"), steps=20).build(out / "video-lm")
    recipe = ShapesTinyEncoder(shapes, num_images=32, steps=5, num_held_out=0)
    TimmEncoder("test_resnet", checkpoint_path=str(out / "encoder.pth"), transform=TRANSFORM, build_if_missing=recipe)
    return out
