"""Frozen language models that read soft prompts.

A new LLM family is one file here: a :class:`~vlgen.interfaces.LanguageModel` (Hugging Face ones subclass
:class:`~vlgen.llms.hf.HFLanguageModel`, which loads, freezes and embeds text, and only lay out prompts, text and
targets); export it below and choose it in YAML (``model.init_args.llm.class_path``).
"""

from vlgen.llms.causal import CausalLM
from vlgen.llms.decoding import Decoding
from vlgen.llms.seq2seq import Seq2SeqLM

__all__ = ["CausalLM", "Decoding", "Seq2SeqLM"]
