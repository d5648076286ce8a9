"""Synthetic worlds generated on demand, so every run and test has data with known ground truth."""

from vlgen.data.synthetic.motion import Clip, MovingObject, MovingShapesWorld, caption_states_motion, motion_captions
from vlgen.data.synthetic.questions import (
    Question,
    annotator_answers,
    clip_questions,
    question_id,
    scene_questions,
    vqa_records,
)
from vlgen.data.synthetic.shapes import (
    Scene,
    SceneObject,
    ShapesWorld,
    caption_states_facts,
    captions,
    render,
    sample_scene,
)
from vlgen.data.synthetic.world import SyntheticWorld

__all__ = [
    "Clip",
    "MovingObject",
    "MovingShapesWorld",
    "Question",
    "Scene",
    "SceneObject",
    "ShapesWorld",
    "SyntheticWorld",
    "annotator_answers",
    "caption_states_facts",
    "caption_states_motion",
    "captions",
    "clip_questions",
    "motion_captions",
    "question_id",
    "render",
    "sample_scene",
    "scene_questions",
    "vqa_records",
]
