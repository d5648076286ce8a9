"""Frozen language models that read soft prompts."""

from vlgen.llms.causal import CausalLM
from vlgen.llms.loading import Decoding

__all__ = ["CausalLM", "Decoding"]
