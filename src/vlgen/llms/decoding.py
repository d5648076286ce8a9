"""How language models decode text: the generation settings every vlgen LLM passes to ``generate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Decoding:
    """How text is decoded; the fields are those of ``transformers.GenerationConfig``.

    Args:
        num_beams: beam width (1 = greedy or sampling).
        max_new_tokens: longest generated text, in tokens.
        min_new_tokens: shortest generated text, in tokens.
        do_sample: sample instead of searching.
        top_p: nucleus sampling mass.
        temperature: sampling temperature.
        repetition_penalty: >1 discourages repeated tokens.
        length_penalty: beam-search length exponent.
    """

    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "length_penalty": self.length_penalty,
        }
        if self.do_sample:
            out.update(top_p=self.top_p, temperature=self.temperature)
        return out
