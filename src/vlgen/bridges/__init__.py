"""Bridges: visual tokens -> LLM prompts (+ auxiliary losses)."""

from vlgen.bridges.projector import LinearProjector, MLPProjector
from vlgen.bridges.qformer import QFormer

__all__ = ["LinearProjector", "MLPProjector", "QFormer"]
