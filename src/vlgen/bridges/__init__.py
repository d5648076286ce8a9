"""Bridges: visual tokens -> LLM prompts (+ auxiliary losses), and the P-Former (text -> the same prompts)."""

from vlgen.bridges.connector import TokenMergingConnector
from vlgen.bridges.pformer import PFormer
from vlgen.bridges.projector import LinearProjector, MLPProjector
from vlgen.bridges.qformer import QFormer

__all__ = ["LinearProjector", "MLPProjector", "PFormer", "QFormer", "TokenMergingConnector"]
