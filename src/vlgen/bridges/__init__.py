"""Bridges: visual tokens -> LLM prompts (+ auxiliary losses)."""

from vlgen.bridges.projector import LinearProjector, MLPProjector

__all__ = ["LinearProjector", "MLPProjector"]
