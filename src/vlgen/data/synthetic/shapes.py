"""The "shapes" world: a seeded generator of images with 1-3 coloured shapes and English captions about them.

A :class:`Scene` is a list of :class:`Shape` objects (shape, colour, size, centre); :func:`render` draws one at any
size, so a video module can move the objects and render frames. Captions state colours, shapes, sizes and spatial
relations in several phrasings, the first one canonical. Every image keeps its ground-truth facts, and
:func:`caption_states_facts` checks a generated caption against them (the demo's "fact accuracy").
:class:`ShapesWorld` writes the world as PNG + COCO-style JSON, which :class:`~vlgen.data.ImageTextDataModule` reads.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlgen.errors import ConfigError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
RADIUS = {"small": 0.1, "large": 0.17}  # half the extent, as a fraction of the image side
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
BACKGROUND = (245, 245, 240)
_ARTICLE = re.compile(r"\ba (?=[aeiou])")  # "a orange square" -> "an orange square"


@dataclass
class Shape:
    """One object: what it is and where its centre lies (x to the right, y downwards, both in [0, 1])."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def name(self, with_size: bool = True) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


Scene = list[Shape]


def relation(a: Shape, b: Shape) -> str:
    """Where ``a`` lies relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def holds(a: Shape, b: Shape, rel: str, margin: float = 0.05) -> bool:
    """Whether "a <rel> b" is true of the picture (either axis counts, with a small margin)."""
    return {
        "left": a.x < b.x - margin,
        "right": a.x > b.x + margin,
        "above": a.y < b.y - margin,
        "below": a.y > b.y + margin,
    }[rel]


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """1..max_objects shapes with distinct (colour, shape), no overlaps and unambiguous pairwise relations."""
    count = int(rng.choice(np.arange(1, max_objects + 1), p=_count_weights(max_objects)))
    kinds = rng.permutation([(c, s) for c in COLORS for s in SHAPES])[:count]
    while True:
        scene = []
        for color, shape in kinds:
            size = str(rng.choice(list(RADIUS)))
            r = RADIUS[size] + 0.03
            scene.append(
                Shape(str(shape), str(color), size, float(rng.uniform(r, 1 - r)), float(rng.uniform(r, 1 - r)))
            )
        if all(_separated(a, b) for a, b in itertools.combinations(scene, 2)):
            return scene


def _count_weights(max_objects: int) -> list[float]:
    w = np.arange(1, max_objects + 1, dtype=float)  # more objects, more often: relations are the hard part
    return list(w / w.sum())


def _separated(a: Shape, b: Shape) -> bool:
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    far_enough = max(dx, dy) > RADIUS[a.size] + RADIUS[b.size] + 0.04
    clear_axis = abs(dx - dy) > 0.12  # the dominant axis is obvious to a viewer
    return far_enough and clear_axis


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene on a plain background; every coordinate scales with ``size``."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        r, cx, cy, fill = RADIUS[obj.size] * size, obj.x * size, obj.y * size, COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.88
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img


def relation_facts(scene: Scene) -> list[tuple[int, str, int]]:
    """The relations the canonical caption states: each object after the first relative to the first."""
    return [(i, relation(scene[i], scene[0]), 0) for i in range(1, len(scene))]


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` distinct phrasings, the first canonical (sizes, colours, shapes and every relation)."""
    a = scene[0]
    if len(scene) == 1:
        options = [
            f"a {a.name()}",
            f"a {a.name(False)}",
            f"there is a {a.name()}",
            f"one {a.name(False)} on a plain background",
            f"a single {a.size} {a.color} {a.shape}",
            f"a {a.color} {a.shape} alone",
            f"the picture shows a {a.name()}",
        ]
    else:
        rels = relation_facts(scene)
        b, rel = scene[rels[0][0]], rels[0][1]
        canonical = f"a {b.name()} {RELATIONS[rel]} a {a.name()}"
        short = f"a {b.name(False)} {RELATIONS[rel]} a {a.name(False)}"
        inverse = f"a {a.name()} is {RELATIONS[INVERSE[rel]]} a {b.name()}"
        if len(scene) == 3:
            third, rel3 = scene[rels[1][0]], rels[1][1]
            canonical += f" and a {third.name()} {RELATIONS[rel3]} the {a.name(False)}"
            short += f" and a {third.name(False)} {RELATIONS[rel3]} the {a.name(False)}"
            inverse += f", with the {a.name(False)} {RELATIONS[INVERSE[rel3]]} a {third.name()}"
        listing = " and ".join(f"a {o.name(False)}" for o in scene)
        options = [
            canonical,
            short,
            inverse,
            f"there is {listing}",
            f"{(len(scene) == 2 and 'two') or 'three'} shapes: {listing}",
            f"{listing} on a plain background",
        ]
    first, rest = options[0], options[1:]
    rng.shuffle(rest)
    return [_ARTICLE.sub("an ", c) for c in [first, *rest][:count]]


def facts_of(scene: Scene) -> dict:
    return {"objects": [asdict(o) for o in scene], "relations": [list(r) for r in relation_facts(scene)]}


def _mentions(words: list[str]) -> list[tuple[int, str, str]]:
    """``(word index, colour, shape)`` for every "colour shape" in a caption."""
    out = []
    for i in range(len(words) - 1):
        shape = words[i + 1].rstrip("s") if words[i + 1].rstrip("s") in SHAPES else None
        if words[i] in COLORS and shape:
            out.append((i, words[i], shape))
    return out


def caption_states_facts(caption: str, facts: dict) -> bool:
    """True when ``caption`` names every object by colour and shape, no object that is not there, and - with two
    or more objects - relations that hold and link every object (e.g. "a red circle to the left of a blue square").
    """
    objects = [Shape(**o) for o in facts["objects"]]
    by_kind = {(o.color, o.shape): o for o in objects}
    words = caption.lower().replace(",", " ").split()
    mentions = _mentions(words)
    named = {(c, s) for _, c, s in mentions}
    if named != set(by_kind):
        return False
    if len(objects) == 1:
        return True
    linked: set[tuple[str, str]] = set()
    for (i, c1, s1), (j, c2, s2) in itertools.pairwise(mentions):
        between = " ".join(words[i + 2 : j])
        stated = [r for r in ("left", "right", "above", "below") if r in between.split()]
        if len(stated) != 1:
            continue  # "and", a listing: no relation stated between these two
        if (c1, s1) == (c2, s2) or not holds(by_kind[(c1, s1)], by_kind[(c2, s2)], stated[0]):
            return False
        linked |= {(c1, s1), (c2, s2)}
    return linked == set(by_kind)


class ShapesWorld:
    """A synthetic image-caption world written to disk as PNG + COCO-style JSON.

    Args:
        seed: everything (scenes, phrasings, splits) follows from it.
        num_train: training images (one annotation per caption).
        num_val: validation images (one annotation per image with all its captions).
        num_test: test images (as validation, plus ground-truth facts).
        image_size: side of the square images in pixels.
        captions_per_image: phrasings per image (the first is canonical).
        num_text: sentences of the text-only corpus, from scenes that are never rendered.
    """

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        image_size: int = 64,
        captions_per_image: int = 5,
        num_text: int = 20000,
    ) -> None:
        self.args = {
            "seed": seed,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "image_size": image_size,
            "captions_per_image": captions_per_image,
            "num_text": num_text,
        }

    def is_written(self, root: str | Path) -> bool:
        """True when ``root`` holds a complete world made with these arguments."""
        marker = Path(root) / "world.json"
        if not marker.is_file():
            return False
        if json.loads(marker.read_text()) != self.args:
            raise ConfigError(f"data.root: {root} holds a shapes world made with other arguments; use another root")
        return True

    def write(self, root: str | Path) -> Path:
        """Write the world into ``root`` (a no-op when it is already there); returns ``root``."""
        root = Path(root)
        if self.is_written(root):
            return root
        a = self.args
        tmp = root.with_name(f".{root.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        rng = np.random.default_rng(a["seed"])
        for split in ("train", "val", "test"):
            records = []
            for index in range(a[f"num_{split}"]):
                scene = sample_scene(rng)
                name = f"images/{split}_{index:06d}.png"
                render(scene, a["image_size"]).save(tmp / name)
                caps = captions(scene, rng, a["captions_per_image"])
                image_id = f"{split}_{index:06d}"
                if split == "train":
                    records += [{"image": name, "caption": c, "image_id": image_id} for c in caps]
                else:
                    records.append({"image": name, "caption": caps, "image_id": image_id, "facts": facts_of(scene)})
            (tmp / f"{split}.json").write_text(json.dumps(records))
        with open(tmp / "corpus.txt", "w") as f:
            written = 0
            while written < a["num_text"]:
                for caption in captions(sample_scene(rng), rng, a["captions_per_image"]):
                    if written < a["num_text"]:
                        f.write(caption + "\n")
                        written += 1
        (tmp / "world.json").write_text(json.dumps(self.args))
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists() and not any(root.iterdir()):
            root.rmdir()
        tmp.rename(root)
        return root
