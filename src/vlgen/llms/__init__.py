"""Frozen language models that read soft prompts."""

from vlgen.llms.causal import CausalLM
from vlgen.llms.decoding import Decoding
from vlgen.llms.seq2seq import Seq2SeqLM

__all__ = ["CausalLM", "Decoding", "Seq2SeqLM"]
