"""The shapes world: determinism, captions consistent with facts, the fact checker, atomic writing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlgen.data.synthetic import ShapesWorld, caption_states_facts, render, sample_scene
from vlgen.data.synthetic.shapes import captions, facts_of
from vlgen.errors import ConfigError

SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "num_text": 50}


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a = ShapesWorld(seed=1, **SMALL).write(tmp_path / "a")
    b = ShapesWorld(seed=1, **SMALL).write(tmp_path / "b")
    c = ShapesWorld(seed=2, **SMALL).write(tmp_path / "c")
    for name in ("train.json", "val.json", "test.json", "corpus.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    assert (a / "images/train_000003.png").read_bytes() == (b / "images/train_000003.png").read_bytes()


def test_layout_and_counts(tmp_path):
    root = ShapesWorld(seed=0, captions_per_image=3, **SMALL).write(tmp_path / "w")
    train = json.loads((root / "train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    assert len(train) == 12 * 3 and len({r["image_id"] for r in train}) == 12
    assert len(test) == 4 and all(len(r["caption"]) == 3 and "facts" in r for r in test)
    assert len((root / "corpus.txt").read_text().splitlines()) == 50
    assert all((root / r["image"]).is_file() for r in train + test)


def test_rewrite_is_a_noop_and_other_arguments_are_refused(tmp_path):
    root = ShapesWorld(seed=0, **SMALL).write(tmp_path / "w")
    stamp = (root / "train.json").stat().st_mtime_ns
    ShapesWorld(seed=0, **SMALL).write(root)
    assert (root / "train.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other arguments"):
        ShapesWorld(seed=5, **SMALL).write(root)
    assert not list(tmp_path.glob(".*partial*"))


def test_captions_name_exactly_the_objects_in_the_picture():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = sample_scene(rng)
        caps = captions(scene, rng, 5)
        assert len(set(caps)) == 5
        for cap in caps:
            for obj in scene:
                assert f"{obj.color} {obj.shape}" in cap
        assert caption_states_facts(caps[0], facts_of(scene)), caps[0]  # the canonical caption is fully right


def test_fact_checker_rejects_wrong_captions():
    facts = {
        "objects": [
            {"shape": "circle", "color": "red", "size": "large", "x": 0.2, "y": 0.5},
            {"shape": "square", "color": "blue", "size": "small", "x": 0.8, "y": 0.5},
        ],
        "relations": [[1, "right", 0]],
    }
    assert caption_states_facts("a red circle to the left of a blue square", facts)
    assert caption_states_facts("a small blue square is to the right of a large red circle", facts)
    assert not caption_states_facts("a red circle to the right of a blue square", facts)  # wrong relation
    assert not caption_states_facts("a green circle to the left of a blue square", facts)  # wrong colour
    assert not caption_states_facts("a red circle", facts)  # missing object
    assert not caption_states_facts("a red circle and a blue square", facts)  # no relation stated
    assert not caption_states_facts("a red circle left of a blue square and a green triangle", facts)  # extra object


def test_render_draws_the_colours():
    scene = sample_scene(np.random.default_rng(0))
    img = np.asarray(render(scene, 64))
    assert img.shape == (64, 64, 3)
    assert len({tuple(p) for p in img.reshape(-1, 3)}) > 2  # background plus shape colours
