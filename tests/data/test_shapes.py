"""The shapes world: determinism, captions consistent with facts, the fact checker, rendering, atomic writing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vlgen.data.synthetic import Scene, SceneObject, ShapesWorld, caption_states_facts, captions, render, sample_scene
from vlgen.data.synthetic import shapes as shapes_module
from vlgen.data.synthetic.shapes import COLORS, SHAPES, canonical_caption, relation
from vlgen.errors import ConfigError

SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "num_text": 50}
FILES = ("train.json", "val.json", "test.json", "corpus.txt", "world.json")


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a = ShapesWorld(seed=1, **SMALL).write(tmp_path / "a")
    b = ShapesWorld(seed=1, **SMALL).write(tmp_path / "b")
    c = ShapesWorld(seed=2, **SMALL).write(tmp_path / "c")
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("train.json", "val.json", "test.json", "corpus.txt"):
        assert (a / name).read_bytes() != (c / name).read_bytes(), name
    images = sorted(p.name for p in (a / "images").iterdir())
    assert images == sorted(p.name for p in (b / "images").iterdir())
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in images)


def test_evaluation_splits_do_not_depend_on_the_training_size(tmp_path):
    a = ShapesWorld(seed=3, **SMALL).write(tmp_path / "a")
    b = ShapesWorld(seed=3, **{**SMALL, "num_train": 2}).write(tmp_path / "b")
    assert (a / "test.json").read_bytes() == (b / "test.json").read_bytes()
    assert (a / "train.json").read_bytes() != (b / "train.json").read_bytes()


def test_layout_and_counts(tmp_path):
    root = ShapesWorld(seed=0, captions_per_image=3, image_size=48, **SMALL).write(tmp_path / "w")
    train = json.loads((root / "train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    assert len(train) == 12 * 3 and len({r["image_id"] for r in train}) == 12
    assert all(isinstance(r["caption"], str) for r in train)
    assert len(test) == 4 and all(len(r["caption"]) == 3 and set(r["facts"]) == {"objects", "relations"} for r in test)
    assert len((root / "corpus.txt").read_text().splitlines()) == 50
    assert all((root / r["image"]).is_file() for r in train + test)
    assert len(list((root / "images").iterdir())) == 12 + 4 + 4
    assert json.loads((root / "world.json").read_text())["captions_per_image"] == 3


def test_images_show_the_facts(tmp_path):
    root = ShapesWorld(seed=4, image_size=64, **SMALL).write(tmp_path / "w")
    from PIL import Image

    for record in json.loads((root / "val.json").read_text()):
        pixels = np.asarray(Image.open(root / record["image"]))
        assert pixels.shape == (64, 64, 3)
        assert tuple(pixels[0, 0]) == shapes_module.BACKGROUND
        for obj in record["facts"]["objects"]:
            assert tuple(pixels[int(obj["y"] * 64), int(obj["x"] * 64)]) == COLORS[obj["color"]]
        assert pixels.tobytes() == render(Scene.from_facts(record["facts"]), 64).tobytes()


def test_rewrite_is_a_noop_and_other_arguments_are_refused(tmp_path):
    root = ShapesWorld(seed=0, **SMALL).write(tmp_path / "w")
    stamp = (root / "train.json").stat().st_mtime_ns
    assert ShapesWorld(seed=0, **SMALL).write(root) == root
    assert (root / "train.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"other arguments: seed=0 \(wanted 5\)"):
        ShapesWorld(seed=5, **SMALL).write(root)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a world")
    with pytest.raises(ConfigError, match="holds no complete shapes world"):
        ShapesWorld(seed=0, **SMALL).write(tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    assert (ShapesWorld(seed=0, **SMALL).write(tmp_path / "empty") / "world.json").is_file()
    assert not list(tmp_path.glob(".*partial*"))


def test_an_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def failing_render(scene, size=64, background=shapes_module.BACKGROUND):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render(scene, size, background)

    monkeypatch.setattr(shapes_module, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ShapesWorld(seed=0, **SMALL).write(tmp_path / "w")
    assert not (tmp_path / "w").exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    assert ShapesWorld(seed=0, **SMALL).is_written(ShapesWorld(seed=0, **SMALL).write(tmp_path / "w"))


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="captions_per_image"):
        ShapesWorld(captions_per_image=0)
    with pytest.raises(ConfigError, match="captions_per_image"):
        ShapesWorld(captions_per_image=11)
    with pytest.raises(ConfigError, match=r"world\.questions_per_image") as err:
        ShapesWorld(questions_per_image=-1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("count", [1, 5, 10])
def test_captions_state_exactly_the_objects_in_the_picture(count):
    rng = np.random.default_rng(3)
    sizes = set()
    for _ in range(300):
        scene = sample_scene(rng)
        sizes.add(len(scene.objects))
        caps = captions(scene, rng, count)
        assert len(caps) == count and len(set(caps)) == count
        assert caps[0] == canonical_caption(scene)
        kinds = {(o.color, o.shape) for o in scene.objects}
        for cap in caps:
            assert cap == cap.lower() and not cap.endswith(".") and "  " not in cap
            words = re.sub(r"[^a-z]+", " ", cap).split()
            assert {w for w in words if w in COLORS} == {c for c, _ in kinds}, cap
            assert {w for w in words if w in SHAPES} == {s for _, s in kinds}, cap
            assert caption_states_facts(cap, scene.facts()), (cap, scene)
        for obj in scene.objects:  # the canonical caption gives every size
            assert obj.name() in caps[0]
    assert sizes == {1, 2, 3}


def test_written_references_pass_the_fact_checker(tmp_path):
    root = ShapesWorld(seed=7, **{**SMALL, "num_val": 40}).write(tmp_path / "w")
    for record in json.loads((root / "val.json").read_text()):
        assert all(caption_states_facts(c, record["facts"]) for c in record["caption"])
        scene = Scene.from_facts(record["facts"])
        for rel in record["facts"]["relations"]:
            a, b = scene.objects[rel["subject"]], scene.objects[rel["object"]]
            assert relation(a, b) == rel["relation"]


TWO = Scene((SceneObject("circle", "red", "large", 0.2, 0.5), SceneObject("square", "blue", "small", 0.8, 0.45)))
THREE = Scene((*TWO.objects, SceneObject("triangle", "green", "small", 0.5, 0.9)))


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle to the left of a blue square",
        "a small blue square is right of a large red circle",
        "A big red circle, left of a little blue square.",
        "there is a blue square on the right of a red circle",
    ],
)
def test_fact_checker_accepts_true_captions(caption):
    assert caption_states_facts(caption, TWO.facts())


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle to the right of a blue square",  # wrong relation
        "a blue square to the left of a red circle",  # wrong relation, other order
        "a green circle to the left of a blue square",  # wrong colour
        "a red circle",  # missing object
        "a red circle and a blue square",  # no relation stated
        "a red circle left of a blue square and a green triangle",  # an object that is not there
        "a small red circle to the left of a blue square",  # wrong size
        "a red circle to the left of a square",  # a shape without its colour
        "",
    ],
)
def test_fact_checker_rejects_false_captions(caption):
    assert not caption_states_facts(caption, TWO.facts())


def test_fact_checker_needs_every_object_linked():
    facts = THREE.facts()
    assert caption_states_facts("a red circle left of a blue square and a green triangle below the red circle", facts)
    assert caption_states_facts("a green triangle under a blue square, which is right of a red circle", facts)
    assert not caption_states_facts("a red circle left of a blue square and a green triangle", facts)
    wrong_third = "a red circle left of a blue square, with the red circle below a green triangle"
    assert not caption_states_facts(wrong_third, facts)
    assert caption_states_facts("a red circle", Scene(TWO.objects[:1]))
