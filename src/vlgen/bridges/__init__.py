"""Bridges: visual tokens -> LLM prompts (+ auxiliary losses), and the P-Former (text -> the same prompts).

A new bridge is one file here: a :class:`~vlgen.interfaces.Bridge` with ``build(vision_dim, llm_dim)`` and
``forward``, plus ``prompt_count`` / ``pooled_dim`` when it does not give one prompt per visual token or gives a
pooled feature; export it below and choose it in YAML (``model.init_args.bridge.class_path``).
"""

from vlgen.bridges.connector import TokenMergingConnector
from vlgen.bridges.pformer import PFormer
from vlgen.bridges.projector import LinearProjector, MLPProjector
from vlgen.bridges.qformer import QFormer

__all__ = ["LinearProjector", "MLPProjector", "PFormer", "QFormer", "TokenMergingConnector"]
