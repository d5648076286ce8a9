"""What every Hugging Face language model of vlgen shares: loading, a padding token, decoding settings, freezing.

:class:`~vlgen.llms.CausalLM` and :class:`~vlgen.llms.Seq2SeqLM` differ in how they lay out prompts, text and
targets; everything around that lives here once. A frozen LM stays in eval mode whatever its owner asks.

With ``lora`` (:class:`~vlgen.lora.LoRA`) the frozen LM gets trainable low-rank adapters, injected in place by peft (the
model keeps its class, ``generate`` and ``config``). Its base stays in eval mode as any frozen LM's (its own dropout
off, as BLIP-2 keeps its frozen OPT), while the adapters follow their owner's mode, so that ``lora.dropout`` acts in
training and nowhere else. :meth:`HFLanguageModel.export` writes the LM with its adapters merged in as a plain Hugging
Face directory; :meth:`HFLanguageModel.merge_lora` merges them in place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlgen.interfaces import LanguageModel, no_split_blocks, set_frozen
from vlgen.llms.decoding import Decoding
from vlgen.loading import DType, ModelRecipe, load_pretrained
from vlgen.lora import LoRA, add_lora, merge_lora, merged_state_dict, set_adapters_training


def target_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` (``-100``: not a target), in float32.

    Without ``weights`` the mean over every target token of the batch; with ``weights [B]`` the weighted mean over
    samples of each sample's mean over its own target tokens (a VQA question's answers, each weighted by its share
    of the annotators).
    """
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="none" if weights is not None else "mean")  # fmt: skip
    if weights is None:
        return flat
    real = (labels != -100).float()  # [B, T]
    per_sample = (flat.view(labels.shape) * real).sum(1) / real.sum(1).clamp_min(1.0)  # [B]
    weights = weights.to(per_sample)
    return (weights * per_sample).sum() / weights.sum().clamp_min(1e-12)


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
        lora: LoRA | None,
    ) -> None:
        super().__init__()
        if lora is not None:
            lora.check("llm.lora", frozen)  # before any weight is loaded
        self.model, self.tokenizer = load_pretrained(
            self.auto_class, name_or_path, gguf_file, dtype, "llm", build_if_missing
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.decoding = decoding or Decoding()
        self.max_target_tokens = max_target_tokens
        self.frozen = frozen
        self.lora = lora
        if lora is None:
            set_frozen(self.model, frozen, f"llm {name_or_path}")
        else:
            add_lora(self.model, lora, "llm.lora", f"llm {name_or_path}")

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def block_modules(self) -> list[nn.Module]:
        """The model's decoder layers (encoder and decoder blocks for a seq2seq LM): the classes its
        ``_no_split_modules`` names."""
        return no_split_blocks(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the LM's weights have now: the configured one, or what a strategy cast them to (DeepSpeed's
        bf16 casts the whole model); prompts are cast to it."""
        return self.model.get_input_embeddings().weight.dtype

    def embed_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        table = self.model.get_input_embeddings()
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(table.weight.device), enc["attention_mask"].to(table.weight.device)
        return table(ids), mask  # [B, T, D], [B, T]

    def generate_kwargs(self, decoding: Decoding | None) -> dict[str, Any]:
        """``generate``'s settings: ``decoding`` when given (a task's, e.g. VQA's), else the model's own."""
        return (decoding or self.decoding).kwargs()

    def train(self, mode: bool = True) -> HFLanguageModel:
        super().train(mode and not self.frozen)
        if self.lora is not None:  # the frozen base stays in eval mode; its adapters (their dropout) follow `mode`
            set_adapters_training(self.model, mode)
        return self

    def merge_lora(self) -> Any:
        """Merge the LoRA adapters into the LM's weights in place and return the LM (a plain Hugging Face model, no
        peft layers, the same outputs); afterwards it has nothing left to train. Without adapters: the LM as it is."""
        merge_lora(self.model)
        self.lora = None
        return self.model

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the LM (its LoRA adapters, if any, merged into the weights) and its tokenizer to ``directory`` as a
        plain Hugging Face ``save_pretrained`` directory, without changing this module.

        The result has no peft layers and gives the adapted LM's outputs: ``from_pretrained`` loads it, and so does
        ``llm.name_or_path`` without ``lora`` (the bridge's weights then come from the run's checkpoint, e.g. through
        ``model.init_from``). Returns the directory as a ``Path``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, state_dict=merged_state_dict(self.model))
        self.tokenizer.save_pretrained(out)
        return out
