"""Synthetic worlds generated on demand, so every run and test has data with known ground truth."""

from vlgen.data.synthetic.shapes import ShapesWorld, caption_states_facts, render, sample_scene

__all__ = ["ShapesWorld", "caption_states_facts", "render", "sample_scene"]
