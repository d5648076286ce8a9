"""The "moving shapes" world: short videos of 1-2 coloured shapes that move, stay still, appear or disappear.

Each object of a clip has one motion kind - ``still``, ``left``, ``right``, ``up``, ``down`` (slowly or quickly),
``appears`` or ``disappears`` - and captions state every object's colour, shape and motion in several phrasings,
the first one canonical ("a small red circle moves slowly to the left and a large blue square stays still").
A single frame cannot tell a moving object from a still one, nor which way it goes, nor whether it is about to
vanish: only the frames together reveal what the captions say. Frames are drawn with the shapes world's
:func:`~vlgen.data.synthetic.shapes.render`, and :func:`caption_states_motion` checks a generated caption against
a clip's facts. :class:`MovingShapesWorld` writes ``videos/{split}_{index:06d}.mp4`` (H.264, yuv420p) with
MSR-VTT-style annotations: ``train.json`` (one record per caption), ``val.json`` / ``test.json`` (one record per
video with all its captions and its facts), ``vqa_train.json`` / ``vqa_val.json`` / ``vqa_test.json`` (visual
questions about every video, :mod:`~vlgen.data.synthetic.questions`), ``corpus.txt`` (captions of clips never
rendered, each clip's phrasings on consecutive lines) and the ``world.json`` marker. Each clip draws from its own
generator seeded by ``(seed, split, index)``, so the test split does not change when ``num_train`` does; its
questions draw from another, seeded by ``(seed, split, index, 1)``, so asking more or fewer questions changes no
video, caption or fact.
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlgen.data.synthetic.questions import Question, clip_questions, vqa_records
from vlgen.data.synthetic.shapes import _ARTICLE, COLORS, SHAPES, SIZES, Scene, SceneObject, _mentions, render
from vlgen.data.synthetic.world import SyntheticWorld
from vlgen.errors import ConfigError

VERSION = 2  # bump when a seed starts producing a different world; stored in world.json
MOTIONS = ("still", "left", "right", "up", "down", "appears", "disappears")
STEPS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # unit (dx, dy)
SPEEDS = {"slow": 0.25, "fast": 0.5}  # distance travelled over the clip, as a fraction of the frame side
SPLITS = {"train": 10, "val": 11, "test": 12, "text": 13}  # distinct from the still world's split codes
MAX_CAPTIONS = 10
MAX_QUESTIONS = 10  # question ids leave one decimal digit per question
VERBS = ("moves", "slides", "drifts", "travels")
DIRECTION_PHRASES = {"left": ("to the left", "left", "leftwards"), "right": ("to the right", "right", "rightwards"),
                     "up": ("up", "upwards"), "down": ("down", "downwards")}  # fmt: skip
STATE_PHRASES = {"still": ("stays still", "does not move", "is still"), "appears": ("appears", "comes into view"),
                 "disappears": ("disappears", "vanishes")}  # fmt: skip
ADVERBS = {"slow": "slowly", "fast": "quickly"}
MOTION_WORDS = {"left": "left", "leftwards": "left", "right": "right", "rightwards": "right", "up": "up",
                "upwards": "up", "down": "down", "downwards": "down", "still": "still", "appears": "appears",
                "view": "appears", "disappears": "disappears", "vanishes": "disappears"}  # fmt: skip
SPEED_WORDS = {"slowly": "slow", "slow": "slow", "quickly": "fast", "fast": "fast"}
LEADS = ("", "in this clip ", "in the video ")


@dataclass(frozen=True)
class MovingObject:
    """One object of a clip: what it is, its motion, and where its centre is on the first and the last frame.

    A mover's centre goes in a straight line from ``start`` (frame 0) to ``end`` (the last frame); ``switch_frame``
    is the first frame on which an ``appears`` object is shown, or on which a ``disappears`` object is gone.
    """

    shape: str
    color: str
    size: str
    motion: str
    speed: str | None
    start: tuple[float, float]
    end: tuple[float, float]
    switch_frame: int | None = None

    @property
    def obj(self) -> SceneObject:
        """The object as drawn on the first frame."""
        return SceneObject(self.shape, self.color, self.size, *self.start)

    def at(self, t: int, num_frames: int) -> SceneObject | None:
        """The object as drawn on frame ``t``, or ``None`` when it is not in view."""
        k = self.switch_frame
        if (self.motion == "appears" and t < k) or (self.motion == "disappears" and t >= k):
            return None
        f = t / max(num_frames - 1, 1)
        (x0, y0), (x1, y1) = self.start, self.end
        return replace(self.obj, x=x0 + f * (x1 - x0), y=y0 + f * (y1 - y0))


@dataclass(frozen=True)
class Clip:
    """The objects of one video (distinct colour+shape each) and its length in frames."""

    objects: tuple[MovingObject, ...]
    num_frames: int

    def scene(self, t: int) -> Scene:
        """Frame ``t`` as a still scene: the objects in view, where they are then."""
        return Scene(tuple(o for o in (m.at(t, self.num_frames) for m in self.objects) if o is not None))

    def frames(self, size: int) -> list[Image.Image]:
        return [render(self.scene(t), size) for t in range(self.num_frames)]

    def facts(self) -> dict[str, Any]:
        """JSON-ready ground truth: every object with its motion, speed, start/end centre and switch frame."""
        objects = [{**asdict(m), "start": list(m.start), "end": list(m.end)} for m in self.objects]
        return {"num_frames": self.num_frames, "objects": objects}

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Clip:
        objects = [MovingObject(**{**o, "start": tuple(o["start"]), "end": tuple(o["end"])}) for o in facts["objects"]]
        return cls(tuple(objects), facts["num_frames"])


def sample_clip(rng: np.random.Generator, num_frames: int = 16, max_objects: int = 2) -> Clip:
    """1..max_objects objects with distinct (colour, shape), uniform motion kinds, paths that stay in the frame.

    Start points are drawn 32 at a time and the first set in which no two objects overlap on any frame is kept;
    when 256 draws find none (two large objects crossing quickly at right angles cannot avoid each other), the
    objects themselves are drawn again.
    """
    weights = np.arange(1, max_objects + 1) / (max_objects * (max_objects + 1) / 2)  # more objects more often
    count = 1 + int(rng.choice(max_objects, p=weights))
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    t, f = np.arange(num_frames), np.linspace(0, 1, num_frames)[:, None]  # [T], [T, 1]
    while True:
        picked = [kinds[k] for k in rng.choice(len(kinds), count, replace=False)]
        sizes = ["small" if u < 0.5 else "large" for u in rng.random(count).tolist()]
        motions = [MOTIONS[k] for k in rng.integers(len(MOTIONS), size=count).tolist()]
        speeds = [("slow" if u < 0.5 else "fast") if m in STEPS else None for m, u in zip(motions, rng.random(count))]
        switches = rng.integers(num_frames // 4, 3 * num_frames // 4 + 1, size=count).tolist()
        switches = [k if m in ("appears", "disappears") else None for m, k in zip(motions, switches)]
        radius = np.array([SIZES[z] for z in sizes])  # [count]
        step = np.array([np.multiply(STEPS.get(m, (0, 0)), SPEEDS.get(v, 0)) for m, v in zip(motions, speeds)])
        lo = radius[:, None] + 0.03 + np.maximum(-step, 0)  # [count, 2]: lowest start keeping the path inside
        hi = 1 - radius[:, None] - 0.03 - np.maximum(step, 0)
        shown = [
            t >= k if m == "appears" else t < k if m == "disappears" else t >= 0 for m, k in zip(motions, switches)
        ]
        for _ in range(8):
            start = lo + rng.random((32, count, 2)) * (hi - lo)  # [32, count, 2]
            path = start[:, :, None] + f * step[:, None]  # [32, count, T, 2]
            ok = np.ones(32, dtype=bool)
            for i, j in itertools.combinations(range(count), 2):
                apart = np.abs(path[:, i] - path[:, j]).max(-1) > radius[i] + radius[j] + 0.02  # [32, T]
                ok &= (apart | ~(shown[i] & shown[j])).all(-1)
            if ok.any():
                first = start[int(ok.argmax())]  # [count, 2]
                objects = zip(picked, sizes, motions, speeds, first.tolist(), (first + step).tolist(), switches)
                clip = [MovingObject(s, c, z, m, v, tuple(a), tuple(b), k) for (c, s), z, m, v, a, b, k in objects]
                return Clip(tuple(clip), num_frames)


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[int(u * len(options))]


def _motion_phrase(m: MovingObject, u: list[float]) -> str:
    """A phrasing of one object's motion chosen by three uniform numbers (all zero: the canonical one)."""
    if m.motion in STATE_PHRASES:
        return _pick(STATE_PHRASES[m.motion], u[0])
    verb, where, adverb = _pick(VERBS, u[0]), _pick(DIRECTION_PHRASES[m.motion], u[1]), ADVERBS[m.speed]
    form = int(u[2] * 4)  # speed before / after the direction, or (once in four) not given
    return (f"{verb} {adverb} {where}", f"{verb} {where} {adverb}", f"{verb} {adverb} {where}", f"{verb} {where}")[form]


def canonical_caption(clip: Clip) -> str:
    """Every object with its size and its motion ("moves slowly to the left"), in the clip's order, joined by "and"."""
    text = " and ".join(f"a {m.obj.name()} {_motion_phrase(m, [0.0] * 3)}" for m in clip.objects)
    return _ARTICLE.sub("an ", text)


def _phrasing(clip: Clip, rng: np.random.Generator) -> str:
    u = rng.random(3 + 3 * len(clip.objects)).tolist()  # one RNG call per phrasing
    sized, lead, join = u[0] < 0.5, _pick(LEADS, u[1]), _pick((" and ", " while "), u[2])
    order = rng.permutation(len(clip.objects)).tolist()
    parts = [f"a {clip.objects[i].obj.name(sized)} {_motion_phrase(clip.objects[i], u[3 + 3 * i :])}" for i in order]
    return _ARTICLE.sub("an ", lead + join.join(parts))


def motion_captions(clip: Clip, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` distinct phrasings, the first canonical; lower-case, no final period."""
    out = [canonical_caption(clip)]
    for _ in range(200 * count):
        if len(out) == count:
            break
        text = _phrasing(clip, rng)
        if text not in out:
            out.append(text)
    return out


def caption_states_motion(caption: str, facts: dict[str, Any] | Clip, with_speed: bool = False) -> bool:
    """Whether ``caption`` states every object of the clip with its colour, shape and motion, and nothing wrong.

    The words after an object's shape, up to the next shape, are its motion: they must state exactly its kind
    (a direction, still, appears or disappears; "does not move" means still). A stated size or speed must be
    right (still, appearing and disappearing objects have no speed); ``with_speed`` also requires the speed
    of every moving object.
    """
    clip = facts if isinstance(facts, Clip) else Clip.from_facts(facts)
    verdicts = _verdicts(caption, clip, with_speed)
    return (
        verdicts is not None
        and set(verdicts) == {(m.obj.color, m.obj.shape) for m in clip.objects}
        and all(verdicts.values())
    )


def objects_with_motion_stated(caption: str, facts: dict[str, Any] | Clip) -> tuple[int, int]:
    """``(right, total)``: how many of the clip's objects the caption names (colour and shape) with their motion
    stated as :func:`caption_states_motion` requires, out of how many there are. A softer score than the
    whole-caption check: it gives credit for one object right when another is missed."""
    clip = facts if isinstance(facts, Clip) else Clip.from_facts(facts)
    verdicts = _verdicts(caption, clip, with_speed=False) or {}
    return sum(verdicts.get((m.obj.color, m.obj.shape), False) for m in clip.objects), len(clip.objects)


def _verdicts(caption: str, clip: Clip, with_speed: bool) -> dict[tuple[str, str], bool] | None:
    """Per named (colour, shape): is what the caption says of it right? ``None`` when it names a shape the clip
    does not hold (a wrong colour or shape)."""
    by_kind = {(m.obj.color, m.obj.shape): m for m in clip.objects}
    words = re.sub(r"[^a-z]+", " ", caption.lower()).split()
    mentions = _mentions(words)
    if any((c, s) not in by_kind for _, c, s, _ in mentions):
        return None
    verdicts: dict[tuple[str, str], bool] = {}
    ends = [i for i, *_ in mentions[1:]] + [len(words)]
    for (i, color, shape, size), end in zip(mentions, ends):
        m = by_kind[(color, shape)]
        said = words[i + 1 : end]
        kinds = {MOTION_WORDS[w] for w in said if w in MOTION_WORDS}
        if any(a == "not" and b in ("move", "moving") for a, b in itertools.pairwise(said)):
            kinds.add("still")
        speeds = {SPEED_WORDS[w] for w in said if w in SPEED_WORDS}
        right = not (size and size != m.obj.size) and kinds == {m.motion} and not speeds - {m.speed}
        right = right and not (with_speed and m.speed and not speeds)
        verdicts[(color, shape)] = verdicts.get((color, shape), True) and right
    return verdicts


def _encode(frames: list[Image.Image], path: Path, fps: int, codec: str) -> None:
    """Write RGB frames as an mp4 (yuv420p) at ``fps``, near-lossless."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        # A constant quantiser and one thread per video (the pool runs eight). Not crf: x264's macroblock tree
        # made its output differ between runs on identical input, and a world should be reproducible to the byte.
        x264 = {"qp": "10", "preset": "veryfast", "threads": "1"}
        stream.options = x264 if codec == "libx264" else {"global_quality": str(2 * 118), "flags": "qscale"}  # q 2
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")  # [H, W, 3] uint8
            frame.pts, frame.time_base = t, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


class MovingShapesWorld(SyntheticWorld):
    """A synthetic video-caption world of moving shapes, written as mp4 with MSR-VTT-style JSON.

    Args:
        seed: everything (clips, phrasings) follows from it.
        num_train: training videos (one annotation per caption).
        num_val: validation videos (one annotation per video with all its captions and its facts).
        num_test: test videos (as validation).
        image_size: side of the square frames in pixels (even, for yuv420p).
        num_frames: frames per video.
        fps: frame rate written into the mp4 files.
        captions_per_video: phrasings per video, the first canonical (at most 10).
        num_text: sentences of the text-only corpus, from clips that are never rendered; each clip's phrasings
            are consecutive lines, ``captions_per_video`` of them.
        max_objects: at most this many objects per video (1-3).
        questions_per_video: visual questions per video (at most 10); 0 writes no ``vqa_{split}.json``. Their
            records are LAVIS's converted VQA format with ``video`` / ``video_id`` for ``image`` / ``image_id``:
            ``question_id`` (:func:`~vlgen.data.synthetic.questions.question_id`), ``question``, ``answer`` (ten
            annotator answers), ``multiple_choice_answer`` (the canonical one), ``answer_type``, ``question_type``.
    """

    kind = "moving_shapes"
    version = VERSION

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 600,
        num_val: int = 64,
        num_test: int = 128,
        image_size: int = 64,
        num_frames: int = 16,
        fps: int = 8,
        captions_per_video: int = 5,
        num_text: int = 20000,
        max_objects: int = 2,
        questions_per_video: int = 3,
    ) -> None:
        if not 1 <= captions_per_video <= MAX_CAPTIONS:
            raise ConfigError(f"world.captions_per_video: {captions_per_video} is not in 1..{MAX_CAPTIONS}")
        if not 0 <= questions_per_video <= MAX_QUESTIONS:
            raise ConfigError(f"world.questions_per_video: {questions_per_video} is not in 0..{MAX_QUESTIONS}")
        if not 1 <= max_objects <= 3:
            raise ConfigError(f"world.max_objects: {max_objects} is not in 1..3")
        if image_size < 16 or image_size % 2:
            raise ConfigError(f"world.image_size: {image_size} is not an even number >= 16")
        if num_frames < 4 or fps < 1:
            raise ConfigError(f"world: num_frames ({num_frames}) must be >= 4 and fps ({fps}) >= 1")
        if min(num_train, num_val, num_test, num_text) < 0:
            raise ConfigError("world: counts must be >= 0")
        self.args = {
            "seed": seed,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "image_size": image_size,
            "num_frames": num_frames,
            "fps": fps,
            "captions_per_video": captions_per_video,
            "num_text": num_text,
            "max_objects": max_objects,
            "questions_per_video": questions_per_video,
        }

    @property
    def captions_per_scene(self) -> int:
        return self.args["captions_per_video"]

    def clip(self, split: str, index: int) -> tuple[Clip, list[str]]:
        """The clip and captions of video ``index`` of ``split`` (``"text"`` for the corpus), as written."""
        rng = np.random.default_rng([self.args["seed"], SPLITS[split], index])
        clip = sample_clip(rng, self.args["num_frames"], self.args["max_objects"])
        return clip, motion_captions(clip, rng, self.args["captions_per_video"])

    def questions(self, split: str, index: int, clip: Clip | None = None) -> list[Question]:
        """The questions about video ``index`` of ``split``, as written (``clip``: that video's, when at hand)."""
        clip = clip if clip is not None else self.clip(split, index)[0]
        rng = np.random.default_rng([self.args["seed"], SPLITS[split], index, 1])  # not the clip's generator
        return clip_questions(clip, rng, self.args["questions_per_video"])

    def video(self, split: str, index: int) -> tuple[list[Image.Image], list[str], dict[str, Any]]:
        """Video ``index`` of ``split`` rendered in memory: its frames, captions and facts."""
        clip, caps = self.clip(split, index)
        return clip.frames(self.args["image_size"]), caps, clip.facts()

    def _write_into(self, out: Path) -> None:
        try:
            import av
        except ImportError:
            raise ConfigError("writing a video world needs PyAV: pip install 'vlgen[video]'") from None
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        (out / "videos").mkdir()
        size, fps = self.args["image_size"], self.args["fps"]

        def draw(clip: Clip, video: str) -> None:
            _encode(clip.frames(size), out / video, fps, codec)

        with ThreadPoolExecutor(max_workers=8) as pool:  # the encoders release the GIL
            for split in ("train", "val", "test"):
                records: list[dict[str, Any]] = []
                questions: list[dict[str, Any]] = []
                drawn = []
                for index in range(self.args[f"num_{split}"]):
                    clip, caps = self.clip(split, index)
                    video_id = f"{split}_{index:06d}"
                    video = f"videos/{video_id}.mp4"
                    drawn.append(pool.submit(draw, clip, video))
                    questions += vqa_records(self.questions(split, index, clip), SPLITS[split], index, video, "video")
                    if split == "train":
                        records += [{"video": video, "caption": c, "video_id": video_id} for c in caps]
                    else:
                        records.append({"video": video, "caption": caps, "video_id": video_id, "facts": clip.facts()})
                for future in drawn:
                    future.result()  # re-raises a failed write
                self._write_records(out / f"{split}.json", records)
                if self.args["questions_per_video"]:
                    self._write_records(out / f"vqa_{split}.json", questions)
        self._write_corpus(out / "corpus.txt", lambda index: self.clip("text", index)[1])
