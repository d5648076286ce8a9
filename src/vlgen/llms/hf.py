"""What every Hugging Face language model of vlgen shares: loading, a padding token, decoding settings, freezing.

:class:`~vlgen.llms.CausalLM` and :class:`~vlgen.llms.Seq2SeqLM` differ in how they lay out prompts, text and
targets; everything around that lives here once. A frozen LM stays in eval mode whatever its owner asks.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from vlgen.interfaces import LanguageModel, set_frozen
from vlgen.llms.decoding import Decoding
from vlgen.loading import DType, ModelRecipe, load_pretrained, torch_dtype


class HFLanguageModel(LanguageModel):
    """Loads ``auto_class`` from ``name_or_path`` and keeps the settings both kinds of LM read.

    Subclasses set ``auto_class`` and document their arguments (their signatures are the CLI's).
    """

    auto_class: ClassVar[Any]

    def __init__(
        self,
        name_or_path: str,
        gguf_file: str | None,
        dtype: DType,
        frozen: bool,
        decoding: Decoding | None,
        max_target_tokens: int,
        build_if_missing: ModelRecipe | None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = load_pretrained(
            self.auto_class, name_or_path, gguf_file, dtype, "llm", build_if_missing
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.decoding = decoding or Decoding()
        self.max_target_tokens = max_target_tokens
        self.dtype = torch_dtype(dtype)
        self.frozen = frozen
        set_frozen(self.model, frozen, f"llm {name_or_path}")

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def embed_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        table = self.model.get_input_embeddings()
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(table.weight.device), enc["attention_mask"].to(table.weight.device)
        return table(ids), mask  # [B, T, D], [B, T]

    def train(self, mode: bool = True) -> HFLanguageModel:
        super().train(mode and not self.frozen)
        return self
