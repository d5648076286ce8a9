"""Auxiliary training objectives: losses with their own weight, listed in YAML under ``model.init_args.objectives``.

A new objective is one file here: an :class:`Objective` with a ``name``, a ``weight``, ``build(parts)`` (size its
layers, check the bridge gives what it reads) and ``loss(out, batch, parts)``; export it below.
"""

from vlgen.objectives.alignment import PromptAlignment
from vlgen.objectives.base import ModelParts, Objective
from vlgen.objectives.contrast import ImageTextContrast, PooledContrast, SentenceContrast, itc_loss

__all__ = [
    "ImageTextContrast",
    "ModelParts",
    "Objective",
    "PooledContrast",
    "PromptAlignment",
    "SentenceContrast",
    "itc_loss",
]
