"""The moving-shapes video world: determinism, motion visible in the frames, the motion checker, mp4 writing."""

from __future__ import annotations

import collections
import itertools
import json
import sys

import numpy as np
import pytest

from vlgen.data.synthetic import (
    Clip,
    MovingObject,
    MovingShapesWorld,
    ShapesWorld,
    caption_states_motion,
    motion_captions,
)
from vlgen.data.synthetic.motion import MOTIONS, SPEEDS, canonical_caption, objects_with_motion_stated, sample_clip
from vlgen.data.synthetic.shapes import COLORS, SIZES
from vlgen.errors import ConfigError

VQA_FILES = ("vqa_train.json", "vqa_val.json", "vqa_test.json")
SMALL = {"num_train": 6, "num_val": 3, "num_test": 3, "num_text": 23, "image_size": 32, "num_frames": 8}


def centroids(frames, color: str) -> list[np.ndarray | None]:
    """Per frame, the mean (x, y) of the pixels of exactly ``color`` (in pixels), or None when there are none."""
    out = []
    for frame in frames:
        mask = (np.asarray(frame) == COLORS[color]).all(-1)  # [H, W]
        ys, xs = np.nonzero(mask)
        out.append(np.array([xs.mean(), ys.mean()]) if len(xs) else None)
    return out


def test_same_seed_same_videos_and_the_test_split_ignores_num_train():
    a, b, c = MovingShapesWorld(seed=1), MovingShapesWorld(seed=1, num_train=5), MovingShapesWorld(seed=2)
    for index in range(4):
        frames_a, caps_a, facts_a = a.video("test", index)
        frames_b, caps_b, facts_b = b.video("test", index)
        assert caps_a == caps_b and facts_a == facts_b
        assert [f.tobytes() for f in frames_a] == [f.tobytes() for f in frames_b]
        assert len(frames_a) == 16 and frames_a[0].size == (64, 64)
    assert [a.video("test", i)[2] for i in range(4)] != [c.video("test", i)[2] for i in range(4)]
    assert a.clip("train", 0)[0] != a.clip("test", 0)[0]  # each split draws its own clips
    still = ShapesWorld(seed=1).scene("test", 0)[0]  # and not the still world's scenes
    assert [(o.color, o.shape) for o in still.objects] != [(m.color, m.shape) for m in a.clip("test", 0)[0].objects]


def test_the_motion_is_visible_in_the_frames():
    world, size, seen = MovingShapesWorld(seed=3), 64, collections.Counter()
    for index in range(80):
        frames, _, facts = world.video("val", index)
        colors = [o["color"] for o in facts["objects"]]
        for obj in facts["objects"]:
            if colors.count(obj["color"]) > 1:
                continue  # two objects of one colour share a mask
            track, motion, k = centroids(frames, obj["color"]), obj["motion"], obj["switch_frame"]
            if motion in ("appears", "disappears"):
                shown = [p is not None for p in track]
                assert shown == [(t >= k) == (motion == "appears") for t in range(16)], (index, obj)
            else:
                assert all(p is not None for p in track)
                moved = (track[-1] - track[0]) / size  # [2]: (dx, dy) as a fraction of the side
                want = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion]
                want = np.multiply(want, SPEEDS.get(obj["speed"], 0))
                assert np.abs(moved - want).max() < 0.04, (index, obj, moved)
                assert np.allclose(track[0] / size, obj["start"], atol=0.04)
            seen[motion] += 1
    assert set(seen) == set(MOTIONS), seen


def test_paths_stay_inside_objects_never_overlap_and_motions_are_balanced():
    rng, kinds, counts = np.random.default_rng(0), collections.Counter(), collections.Counter()
    for _ in range(400):
        clip = sample_clip(rng, num_frames=12, max_objects=3)
        counts[len(clip.objects)] += 1
        assert len({(m.color, m.shape) for m in clip.objects}) == len(clip.objects)
        for m in clip.objects:
            kinds[m.motion] += 1
            assert (m.speed is None) == (m.motion not in ("left", "right", "up", "down"))
            assert (m.switch_frame is None) == (m.motion not in ("appears", "disappears"))
            if m.switch_frame is not None:
                assert 3 <= m.switch_frame <= 9
        for t in range(12):
            objects = clip.scene(t).objects
            for o in objects:
                assert SIZES[o.size] < o.x < 1 - SIZES[o.size] and SIZES[o.size] < o.y < 1 - SIZES[o.size]
            for a, b in itertools.combinations(objects, 2):
                assert max(abs(a.x - b.x), abs(a.y - b.y)) > SIZES[a.size] + SIZES[b.size]
    assert set(counts) == {1, 2, 3}
    share = np.array([kinds[m] for m in MOTIONS]) / sum(kinds.values())
    assert share.min() > 0.1 and share.max() < 0.18, kinds


@pytest.mark.parametrize("count", [1, 5, 10])
def test_every_phrasing_states_its_own_facts(count):
    rng, without_speed = np.random.default_rng(5), 0
    for _ in range(300):
        clip = sample_clip(rng, max_objects=3)
        caps = motion_captions(clip, rng, count)
        assert len(caps) == count and len(set(caps)) == count and caps[0] == canonical_caption(clip)
        facts = json.loads(json.dumps(clip.facts()))  # as read back from val.json
        for cap in caps:
            assert cap == cap.lower() and "  " not in cap and not cap.endswith(".")
            assert caption_states_motion(cap, facts), (cap, facts)
            without_speed += not caption_states_motion(cap, facts, with_speed=True)
        assert caption_states_motion(caps[0], facts, with_speed=True)  # the canonical one gives every speed
    assert without_speed > 0 or count == 1  # some phrasings leave the speed out


def test_the_canonical_caption():
    clip = Clip(
        (
            MovingObject("circle", "red", "small", "left", "slow", (0.6, 0.3), (0.35, 0.3)),
            MovingObject("square", "orange", "large", "still", None, (0.5, 0.75), (0.5, 0.75)),
        ),
        16,
    )
    assert (
        canonical_caption(clip) == "a small red circle moves slowly to the left and a large orange square stays still"
    )


MOVING = Clip(
    (
        MovingObject("circle", "red", "small", "left", "slow", (0.6, 0.3), (0.35, 0.3)),
        MovingObject("square", "blue", "large", "still", None, (0.5, 0.75), (0.5, 0.75)),
    ),
    16,
).facts()
SWITCHING = Clip(
    (
        MovingObject("triangle", "green", "small", "appears", None, (0.3, 0.3), (0.3, 0.3), 6),
        MovingObject("circle", "yellow", "small", "disappears", None, (0.7, 0.7), (0.7, 0.7), 9),
    ),
    16,
).facts()


@pytest.mark.parametrize(
    "caption",
    [
        "a small red circle moves slowly to the left and a large blue square stays still",
        "A blue square does not move, while a red circle drifts leftwards.",
        "in this clip a red circle slides left and a big blue square is still",
        "a red circle moves slow to the left and a blue square stays still",
    ],
)
def test_motion_checker_accepts_true_captions(caption):
    assert caption_states_motion(caption, MOVING)


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle moves to the right and a blue square stays still",  # swapped direction
        "a red circle moves up and a blue square stays still",  # wrong axis
        "a green circle moves to the left and a blue square stays still",  # wrong colour
        "a red square moves to the left and a blue circle stays still",  # colours swapped between shapes
        "a red circle moves to the left",  # missing object
        "a red circle moves to the left and a blue square moves left",  # the still one said to move
        "a red circle stays still and a blue square stays still",  # the mover said to stay
        "a red circle moves quickly to the left and a blue square stays still",  # wrong speed
        "a red circle moves left and a blue square quickly stays still",  # a speed for a still object
        "a large red circle moves left and a blue square stays still",  # wrong size
        "a red circle moves left and a blue square stays still and a green triangle appears",  # an extra object
        "a red circle moves left and right and a blue square stays still",  # two directions
        "a red circle and a blue square",  # no motion stated
        "a red circle moves left and a square stays still",  # a shape without its colour
        "",
    ],
)
def test_motion_checker_rejects_false_captions(caption):
    assert not caption_states_motion(caption, MOVING)


@pytest.mark.parametrize(
    "caption, right",
    [
        ("a small red circle moves slowly to the left and a large blue square stays still", 2),
        ("a red circle moves to the left and a blue square moves up", 1),  # one motion wrong
        ("a red circle moves to the left", 1),  # one object missing
        ("a red circle moves right and a blue square moves left", 0),
        ("a green circle moves to the left and a blue square stays still", 0),  # a shape the clip does not hold
    ],
)
def test_objects_with_motion_stated_gives_credit_per_object(caption, right):
    assert objects_with_motion_stated(caption, MOVING) == (right, 2)


def test_motion_checker_on_appearing_and_speed():
    assert caption_states_motion("a green triangle appears and a yellow circle vanishes", SWITCHING)
    assert caption_states_motion("a yellow circle disappears while a green triangle comes into view", SWITCHING)
    assert not caption_states_motion("a green triangle disappears and a yellow circle appears", SWITCHING)
    assert not caption_states_motion("a green triangle appears and a yellow circle stays still", SWITCHING)
    assert caption_states_motion("a red circle moves left and a blue square is still", MOVING)
    assert not caption_states_motion("a red circle moves left and a blue square is still", MOVING, with_speed=True)
    assert caption_states_motion("a red circle moves left slowly and a blue square is still", MOVING, with_speed=True)
    assert caption_states_motion("a green triangle appears and a yellow circle vanishes", SWITCHING, with_speed=True)


def test_a_written_world_has_the_msrvtt_layout_and_decodes(tmp_path):
    import decord

    world = MovingShapesWorld(seed=2, captions_per_video=3, **SMALL)
    root = world.write(tmp_path / "w")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["videos", "train.json", "val.json", "test.json", "corpus.txt", "world.json", *VQA_FILES]
    )
    train = json.loads((root / "train.json").read_text())
    assert len(train) == 6 * 3 and all(set(r) == {"video", "caption", "video_id"} for r in train)
    assert train[0] == {"video": "videos/train_000000.mp4", "caption": train[0]["caption"], "video_id": "train_000000"}
    assert [r["caption"] for r in train[:3]] == world.video("train", 0)[1]
    assert len((root / "corpus.txt").read_text().splitlines()) == 23
    assert sorted(p.name for p in (root / "videos").iterdir()) == sorted(
        f"{s}_{i:06d}.mp4" for s, n in (("train", 6), ("val", 3), ("test", 3)) for i in range(n)
    )
    marker = json.loads((root / "world.json").read_text())
    assert marker == {**world.args, "version": 2, "kind": "moving_shapes"}
    for split in ("val", "test"):
        records = json.loads((root / f"{split}.json").read_text())
        assert [r["video_id"] for r in records] == [f"{split}_{i:06d}" for i in range(3)]
        for index, record in enumerate(records):
            frames, caps, facts = world.video(split, index)
            assert set(record) == {"video", "caption", "video_id", "facts"}
            assert record["caption"] == caps and record["facts"] == facts
            assert all(caption_states_motion(c, record["facts"]) for c in record["caption"])
            reader = decord.VideoReader(str(root / record["video"]))
            assert len(reader) == 8 and reader.get_avg_fps() == pytest.approx(8)
            decoded = reader.get_batch(list(range(8))).asnumpy()  # [T, H, W, 3]
            assert decoded.shape == (8, 32, 32, 3)
            rendered = np.stack([np.asarray(f) for f in frames])  # [T, H, W, 3]
            assert np.abs(decoded.astype(int) - rendered).mean() < 4
            clip = Clip.from_facts(facts)
            for t, m in itertools.product(range(8), clip.objects):
                obj = m.at(t, 8)
                if obj is not None:  # the centre is inside every shape, away from the blurred edges
                    pixel = decoded[t, int(obj.y * 32), int(obj.x * 32)].astype(int)
                    assert np.abs(pixel - COLORS[obj.color]).max() < 48, (record["video_id"], t, obj, pixel)


def test_writing_is_reproducible_to_the_byte(tmp_path):
    a = MovingShapesWorld(seed=4, **SMALL).write(tmp_path / "a")
    b = MovingShapesWorld(seed=4, **SMALL).write(tmp_path / "b")
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(names) == 8 + 12
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_rewrite_is_a_noop_and_other_worlds_are_refused(tmp_path):
    root = MovingShapesWorld(seed=0, **SMALL).write(tmp_path / "w")
    stamp = (root / "videos" / "test_000000.mp4").stat().st_mtime_ns
    assert MovingShapesWorld(seed=0, **SMALL).write(root) == root
    assert (root / "videos" / "test_000000.mp4").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"other arguments: seed=0 \(wanted 5\)") as err:
        MovingShapesWorld(seed=5, **SMALL).write(root)
    assert "\n" not in str(err.value) and str(root) in str(err.value)
    with pytest.raises(ConfigError, match="holds a moving_shapes world, not a shapes world"):
        ShapesWorld(seed=0).write(root)
    shapes = ShapesWorld(seed=0, num_train=2, num_val=1, num_test=1, num_text=5).write(tmp_path / "s")
    with pytest.raises(ConfigError, match="holds a shapes world, not a moving_shapes world"):
        MovingShapesWorld(seed=0, **SMALL).write(shapes)
    legacy = json.loads((shapes / "world.json").read_text())  # a marker written before worlds recorded a kind
    del legacy["kind"]
    (shapes / "world.json").write_text(json.dumps(legacy))
    assert ShapesWorld(seed=0, num_train=2, num_val=1, num_test=1, num_text=5).is_written(shapes)
    assert not list(tmp_path.glob(".*partial*"))


def test_without_pyav_the_error_is_one_line_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'vlgen\[video\]'") as err:
        MovingShapesWorld(**SMALL).write(tmp_path / "w")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_the_corpus_suits_the_tiny_lm(tmp_path):
    world = MovingShapesWorld(seed=6, captions_per_video=4, **{**SMALL, "num_text": 40})
    assert world.captions_per_scene == 4
    assert ShapesWorld(captions_per_image=3).captions_per_scene == 3
    lines = (world.write(tmp_path / "w") / "corpus.txt").read_text().splitlines()
    blocks = [lines[i : i + 4] for i in range(0, 40, 4)]  # what ShapesTinyLM reads as one clip's phrasings
    for index, block in enumerate(blocks):
        clip, caps = world.clip("text", index)
        assert block == caps and all(caption_states_motion(c, clip) for c in block)
    rendered = [world.clip(split, i)[0] for split, n in (("train", 6), ("val", 3), ("test", 3)) for i in range(n)]
    assert not set(rendered) & {world.clip("text", i)[0] for i in range(10)}  # the corpus clips are never shown


def test_bad_arguments_are_named_and_the_cli_builds():
    from jsonargparse import ArgumentParser

    for bad, option in (({"captions_per_video": 0}, "captions_per_video"), ({"captions_per_video": 11}, "captions")):
        with pytest.raises(ConfigError, match=option):
            MovingShapesWorld(**bad)
    with pytest.raises(ConfigError, match="image_size"):
        MovingShapesWorld(image_size=33)
    with pytest.raises(ConfigError, match="max_objects"):
        MovingShapesWorld(max_objects=4)
    with pytest.raises(ConfigError, match=r"world\.questions_per_video"):
        MovingShapesWorld(questions_per_video=-1)
    parser = ArgumentParser()
    parser.add_class_arguments(MovingShapesWorld, "world")
    world = parser.instantiate_classes(parser.parse_args(["--world.num_frames=8", "--world.fps=4"])).world
    assert world.args["num_frames"] == 8 and world.args["fps"] == 4 and world.args["num_train"] == 600
