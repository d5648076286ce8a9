"""The "shapes" world: a seeded generator of images with 1-3 coloured shapes and English captions about them.

A :class:`Scene` is a tuple of :class:`SceneObject` (shape, colour, size, centre); :func:`render` draws one at any
size, so a video module can move the objects (``dataclasses.replace(obj, x=...)``) and render frames. Captions state
colours, shapes, sizes and spatial relations in several phrasings, the first one canonical, and every phrasing
states a relation that links every object. Every evaluation image keeps its ground-truth facts, and
:func:`caption_states_facts` checks a generated caption against them (the "fact accuracy" score).
:class:`ShapesWorld` writes the world as PNG + COCO-style JSON, which :class:`~vlgen.data.ImageTextDataModule` reads,
and visual questions about every image (:mod:`~vlgen.data.synthetic.questions`) as ``vqa_{split}.json``.
Each scene draws from its own generator seeded by ``(seed, split, index)``, so the test split does not change when
``num_train`` does, and images can be rendered in any order; its questions draw from another, seeded by
``(seed, split, index, 1)``, so asking more or fewer questions changes no image, caption or fact.
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from vlgen.data.synthetic.world import SyntheticWorld
from vlgen.errors import ConfigError

if TYPE_CHECKING:
    from vlgen.data.synthetic.questions import Question

VERSION = 3  # bump when a seed starts producing a different world; stored in world.json
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.1, "large": 0.17}  # half the extent, as a fraction of the image side
BACKGROUND = (245, 245, 240)
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
PHRASES = {  # how captions say "a <rel> b"; the checker reads the marked word
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
RELATION_WORDS = {"left": "left", "right": "right", "above": "above", "below": "below", "under": "below"}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
SPLITS = {"train": 0, "val": 1, "test": 2, "text": 3, "vision": 4}  # text / vision: the tiny LM / encoder
MAX_CAPTIONS = 10
MAX_QUESTIONS = 10  # question ids leave one decimal digit per question
_ARTICLE = re.compile(r"\ba (?=[aeiou])")  # "a orange square" -> "an orange square"


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and where its centre lies (x to the right, y downwards, both in [0, 1])."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def name(self, sized: bool = True) -> str:
        return f"{self.size} {self.color} {self.shape}" if sized else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The objects of one image (or of one video frame), each with a distinct (colour, shape)."""

    objects: tuple[SceneObject, ...]

    def relations(self) -> list[tuple[int, str, int]]:
        """``(i, relation, j)`` meaning "object i <relation> object j", for every pair ``i < j``."""
        return [(i, relation(a, b), j) for (i, a), (j, b) in itertools.combinations(enumerate(self.objects), 2)]

    def facts(self) -> dict[str, Any]:
        """JSON-ready ground truth: the objects and their pairwise relations."""
        rels = [{"subject": i, "relation": r, "object": j} for i, r, j in self.relations()]
        return {"objects": [asdict(o) for o in self.objects], "relations": rels}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Scene:
        return cls(tuple(SceneObject(**o) for o in facts["objects"]))


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` lies relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def holds(a: SceneObject, b: SceneObject, rel: str, margin: float = 0.05) -> bool:
    """Whether "a <rel> b" is true of the picture (either axis counts, beyond a small margin)."""
    if rel == "left":
        return a.x < b.x - margin
    if rel == "right":
        return a.x > b.x + margin
    return a.y < b.y - margin if rel == "above" else a.y > b.y + margin


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """1..max_objects objects with distinct (colour, shape), no overlaps and unambiguous pairwise relations.

    Placements are drawn 32 at a time and the first valid one is kept: every pair needs a visible gap and a
    dominant axis that is obvious to a viewer (``|dx - dy| > 0.12``), so left/right vs above/below is never a tie.
    """
    weights = np.arange(1, max_objects + 1) / (max_objects * (max_objects + 1) / 2)  # more objects more often
    count = 1 + int(rng.choice(max_objects, p=weights))
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    picked = [kinds[k] for k in rng.choice(len(kinds), count, replace=False)]
    small, large = SIZES["small"], SIZES["large"]
    while True:
        u = rng.random((32, count, 3))  # [attempt, object, (size, x, y)]
        radius = np.where(u[..., 0] < 0.5, small, large)  # [32, count]
        lo = radius + 0.03  # keep the whole shape inside the image
        xy = lo[..., None] + u[..., 1:] * (1 - 2 * lo[..., None])  # [32, count, 2]
        ok = np.ones(32, dtype=bool)
        for i, j in itertools.combinations(range(count), 2):
            dx, dy = np.abs(xy[:, i] - xy[:, j]).T  # [32] each
            ok &= (np.maximum(dx, dy) > radius[:, i] + radius[:, j] + 0.04) & (np.abs(dx - dy) > 0.12)
        if ok.any():
            k = int(ok.argmax())
            sizes = ["small" if r == small else "large" for r in radius[k].tolist()]
            places = xy[k].tolist()
            return Scene(tuple(SceneObject(s, c, z, x, y) for (c, s), z, (x, y) in zip(picked, sizes, places)))


def render(scene: Scene, size: int = 64, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Draw a scene on a plain background; every coordinate scales with ``size``."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        r, cx, cy, fill = SIZES[obj.size] * size, obj.x * size, obj.y * size, COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            s = r * 0.88  # about the area of the circle
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[int(u * len(options))]


def _single(scene: Scene, rng: np.random.Generator) -> str:
    u = rng.random(2).tolist()
    templates = ("a {}", "there is a {}", "a picture of a {}", "one {} on a plain background", "a single {}",
                 "a {} alone", "the image shows a {}", "just a {} on a light background")  # fmt: skip
    return _pick(templates, u[0]).format(scene.objects[0].name(sized=u[1] < 0.5))


def _related(scene: Scene, rng: np.random.Generator) -> str:
    """A random phrasing of 2-3 objects whose relations link every object (subject always first)."""
    u = rng.random(9).tolist()  # one RNG call per phrasing
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    sized = u[0] < 0.5
    a, b = objs[0], objs[1]
    verb = _pick(("", " is", " sits"), u[1])
    lead = _pick(("", "there is ", "a picture of "), u[2]) if not verb else ""
    text = f"{lead}a {a.name(sized)}{verb} {_pick(PHRASES[relation(a, b)], u[3])} a {b.name(sized)}"
    if len(objs) == 3:
        c = objs[2]
        form = int(u[4] * 3)
        if form == 0:  # chain: a - b - c
            text += f", which is {_pick(PHRASES[relation(b, c)], u[5])} a {c.name(sized)}"
        elif form == 1:  # star around b, the third object as subject
            text += f" and a {c.name(sized)} {_pick(PHRASES[relation(c, b)], u[6])} the {b.name(False)}"
        else:  # star around a
            text += f", with the {a.name(False)} {_pick(PHRASES[relation(a, c)], u[7])} a {c.name(sized)}"
    return text


def canonical_caption(scene: Scene) -> str:
    """The full description: every object with size, the others placed relative to the first."""
    first, *others = scene.objects
    if not others:
        return _ARTICLE.sub("an ", f"a {first.name()}")
    text = f"a {first.name()} {PHRASES[relation(first, others[0])][0]} a {others[0].name()}"
    for other in others[1:]:
        text += f" and a {other.name()} {PHRASES[relation(other, first)][0]} the {first.name(False)}"
    return _ARTICLE.sub("an ", text)


def captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` distinct phrasings, the first canonical; lower-case, no final period."""
    out = [canonical_caption(scene)]
    phrase = _single if len(scene.objects) == 1 else _related
    for _ in range(200 * count):
        if len(out) == count:
            break
        text = _ARTICLE.sub("an ", phrase(scene, rng))
        if text not in out:
            out.append(text)
    return out


def _mentions(words: list[str]) -> list[tuple[int, str | None, str, str | None]]:
    """``(index, colour, shape, size)`` for every shape word; colour/size are ``None`` when not stated before it."""
    out = []
    for i, word in enumerate(words):
        shape = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if shape in SHAPES:
            color = words[i - 1] if i >= 1 and words[i - 1] in COLORS else None
            size = SIZE_WORDS.get(words[i - 2]) if color and i >= 2 else None
            out.append((i, color, shape, size))
    return out


def caption_states_facts(caption: str, facts: dict[str, Any] | Scene) -> bool:
    """Whether ``caption`` states the picture's facts.

    True when the caption names every object by colour and shape, no shape the picture lacks, no wrong size, and -
    with two or more objects - relations that all hold and link every object. A relation is read between two
    consecutive mentions ("a red circle is left of a blue square": the circle is left of the square), so inverse
    phrasings count; "under" means below.
    """
    scene = facts if isinstance(facts, Scene) else Scene.from_facts(facts)
    by_kind = {(o.color, o.shape): o for o in scene.objects}
    words = re.sub(r"[^a-z]+", " ", caption.lower()).split()
    mentions = _mentions(words)
    if {(c, s) for _, c, s, _ in mentions} != set(by_kind):
        return False  # an object missing, or a shape of a wrong or unstated colour
    if any(size and size != by_kind[(c, s)].size for _, c, s, size in mentions):
        return False
    groups = {kind: {kind} for kind in by_kind}  # connected components of the stated relations
    for (i, c1, s1, _), (j, c2, s2, _) in itertools.pairwise(mentions):
        stated = {RELATION_WORDS[w] for w in words[i + 1 : j] if w in RELATION_WORDS}
        if not stated:
            continue  # "and", a listing: no relation between these two
        a, b = by_kind[(c1, s1)], by_kind[(c2, s2)]
        if a is b or not all(holds(a, b, r) for r in stated):
            return False
        merged = groups[(c1, s1)] | groups[(c2, s2)]
        for kind in merged:
            groups[kind] = merged
    return len(next(iter(groups.values()))) == len(by_kind)


class ShapesWorld(SyntheticWorld):
    """A synthetic image-caption world written to disk as PNG + COCO-style JSON.

    Args:
        seed: everything (scenes, phrasings) follows from it.
        num_train: training images (one annotation per caption).
        num_val: validation images (one annotation per image with all its captions and its facts).
        num_test: test images (as validation).
        image_size: side of the square images in pixels.
        captions_per_image: phrasings per image, the first canonical (at most 10).
        num_text: sentences of the text-only corpus, from scenes that are never rendered; each scene's phrasings
            are consecutive lines, ``captions_per_image`` of them.
        questions_per_image: visual questions per image (at most 10); 0 writes no ``vqa_{split}.json``.

    Files: ``images/{split}_{index:06d}.png``; ``train.json`` (one record per caption), ``val.json`` / ``test.json``
    (one record per image with all its captions and its facts); ``vqa_train.json`` / ``vqa_val.json`` /
    ``vqa_test.json`` (LAVIS's converted VQA records: ``question_id``, ``question``, ``image``, ``image_id``,
    ``answer`` (ten annotator answers), ``multiple_choice_answer`` (the canonical one), ``answer_type`` and
    ``question_type``; ids as :func:`~vlgen.data.synthetic.questions.question_id` gives them); ``corpus.txt``
    and the ``world.json`` marker.
    """

    kind = "shapes"
    version = VERSION

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        image_size: int = 64,
        captions_per_image: int = 5,
        num_text: int = 20000,
        questions_per_image: int = 3,
    ) -> None:
        if not 1 <= captions_per_image <= MAX_CAPTIONS:
            raise ConfigError(f"world.captions_per_image: {captions_per_image} is not in 1..{MAX_CAPTIONS}")
        if not 0 <= questions_per_image <= MAX_QUESTIONS:
            raise ConfigError(f"world.questions_per_image: {questions_per_image} is not in 0..{MAX_QUESTIONS}")
        if min(num_train, num_val, num_test, num_text) < 0 or image_size < 8:
            raise ConfigError("world: counts must be >= 0 and image_size >= 8")
        self.args = {
            "seed": seed,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "image_size": image_size,
            "captions_per_image": captions_per_image,
            "num_text": num_text,
            "questions_per_image": questions_per_image,
        }

    @property
    def captions_per_scene(self) -> int:
        return self.args["captions_per_image"]

    def questions(self, split: str, index: int, scene: Scene | None = None) -> list[Question]:
        """The questions about image ``index`` of ``split``, as written (``scene``: that image's, when at hand)."""
        from vlgen.data.synthetic.questions import scene_questions  # not at import: that module imports this one

        scene = scene if scene is not None else self.scene(split, index)[0]
        rng = np.random.default_rng([self.args["seed"], SPLITS[split], index, 1])  # not the scene's generator
        return scene_questions(scene, rng, self.args["questions_per_image"])

    def scene(self, split: str, index: int) -> tuple[Scene, list[str]]:
        """The scene and captions of image ``index`` of ``split`` (``"text"`` for the corpus), as written.

        ``"vision"`` scenes are never written: the tiny encoder pre-trains on them.
        """
        rng = np.random.default_rng([self.args["seed"], SPLITS[split], index])
        scene = sample_scene(rng)
        return scene, captions(scene, rng, self.args["captions_per_image"])

    def _write_into(self, out: Path) -> None:
        from vlgen.data.synthetic.questions import vqa_records

        (out / "images").mkdir()
        size = self.args["image_size"]

        def draw(scene: Scene, image: str) -> None:
            render(scene, size).save(out / image, compress_level=1)

        with ThreadPoolExecutor(max_workers=8) as pool:  # file creation dominates; PIL and open() release the GIL
            for split in ("train", "val", "test"):
                records: list[dict[str, Any]] = []
                questions: list[dict[str, Any]] = []
                drawn = []
                for index in range(self.args[f"num_{split}"]):
                    scene, caps = self.scene(split, index)
                    image_id = f"{split}_{index:06d}"
                    image = f"images/{image_id}.png"
                    drawn.append(pool.submit(draw, scene, image))
                    questions += vqa_records(self.questions(split, index, scene), SPLITS[split], index, image)
                    if split == "train":
                        records += [{"image": image, "caption": c, "image_id": image_id} for c in caps]
                    else:
                        facts = scene.facts()
                        records.append({"image": image, "caption": caps, "image_id": image_id, "facts": facts})
                for future in drawn:
                    future.result()  # re-raises a failed write
                self._write_records(out / f"{split}.json", records)
                if self.args["questions_per_image"]:
                    self._write_records(out / f"vqa_{split}.json", questions)
        self._write_corpus(out / "corpus.txt", lambda index: self.scene("text", index)[1])
