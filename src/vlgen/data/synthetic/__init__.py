"""Synthetic worlds generated on demand, so every run and test has data with known ground truth."""

from vlgen.data.synthetic.shapes import (
    Scene,
    SceneObject,
    ShapesWorld,
    caption_states_facts,
    captions,
    render,
    sample_scene,
)

__all__ = ["Scene", "SceneObject", "ShapesWorld", "caption_states_facts", "captions", "render", "sample_scene"]
