"""A decoder-only Hugging Face LM (``AutoModelForCausalLM``) that reads soft prompts.

Training input is ``[prompts][prefix tokens][target tokens][eos]`` padded on the right (BLIP-2's layout with OPT:
the prefix keeps its BOS), or with ``prompt_layout: sentence`` ``[bos][prompts][eos][prefix tokens][target
tokens][eos]``, where the prompts stand where an earlier sentence of the document would; the loss covers the target
tokens and the end-of-sequence token only. Generation input is the same without the target, padded on the left so
every sequence ends at the last position (position ids then follow the attention mask, as ``generate`` expects).
A ``context`` text goes before the prompts in either layout (after the BOS in ``sentence``): a chat model's turn
opening, as LLaVA-style models place the picture inside a user message.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

from vlgen.interfaces import all_real
from vlgen.llms.decoding import Decoding
from vlgen.llms.hf import HFLanguageModel
from vlgen.loading import DType, ModelRecipe


class CausalLM(HFLanguageModel):
    """Any ``AutoModelForCausalLM`` (OPT, Llama, SmolLM, Qwen, GPT-2 ...) behind the vlgen interface.

    Args:
        name_or_path: hub id, local directory (``save_pretrained`` layout) or ``pkg:PACKAGE`` (a package that
            ships model files).
        gguf_file: a GGUF file inside ``name_or_path``; dequantised once and cached as safetensors.
        dtype: weights' dtype (prompts are cast to it; the loss is computed in float32).
        frozen: keep every LM parameter fixed (the usual setting); false fine-tunes the LM too.
        decoding: generation settings.
        max_target_tokens: targets longer than this are truncated in training.
        build_if_missing: a recipe that writes the model to ``name_or_path`` when that path does not exist
            (e.g. the tiny LM the CPU configs pre-train on the synthetic world's text).
        prompt_layout: ``prepend`` puts the prompts before all text (BLIP-2 with OPT); ``sentence`` puts them
            after the BOS token and closes them with an EOS token, like a first sentence, which LMs that never saw
            text before their BOS token (e.g. the tiny world LM) read far better.
        context: text placed before the prompts, tokenised as written (no special tokens added), e.g. an instruct
            model's ``"<|im_start|>user\\n"``; the model's ``prompt`` text then closes the turn after the prompts.
    """

    auto_class = transformers.AutoModelForCausalLM

    def __init__(
        self,
        name_or_path: str,
        gguf_file: str | None = None,
        dtype: DType = "float32",
        frozen: bool = True,
        decoding: Decoding | None = None,
        max_target_tokens: int = 64,
        build_if_missing: ModelRecipe | None = None,
        prompt_layout: Literal["prepend", "sentence"] = "prepend",
        context: str = "",
    ) -> None:
        super().__init__(name_or_path, gguf_file, dtype, frozen, decoding, max_target_tokens, build_if_missing)
        self.prompt_layout = prompt_layout
        self.context = context
        self._context_ids: list[int] = self.tokenizer(context, add_special_tokens=False).input_ids if context else []
        # HF causal LMs can project only the last positions to the vocabulary (the name changed in 4.50).
        params = inspect.signature(self.model.forward).parameters
        self._keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    # --- tokenisation -------------------------------------------------------------------------------------------
    def _prefix_ids(self, prefix: str) -> list[int]:
        if self.prompt_layout == "sentence":  # the BOS went before the prompts; an EOS closes them
            return [self.tokenizer.eos_token_id, *self.tokenizer(prefix, add_special_tokens=False).input_ids]
        # The tokenizer's own special tokens (a BOS for Llama/OPT, none for SmolLM/GPT-2) open the text.
        return self.tokenizer(prefix, add_special_tokens=True).input_ids if prefix else self._bos()

    def _head(self, prompts: Tensor, prompt_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The prompts as the LM reads them, ``[B, H + M, D]``, and their mask: after the BOS in ``sentence`` and the
        context, if any."""
        mask = all_real(prompt_mask, prompts).long()
        prompts = prompts.to(self.dtype)
        head = list(self._context_ids)
        if self.prompt_layout == "sentence":  # the document's start: the declared BOS, whatever the tokenizer adds
            bos_id = self.tokenizer.bos_token_id
            head = ([] if bos_id is None else [bos_id]) + head
        if not head:
            return prompts, mask
        start = self._embed(torch.tensor(head, dtype=torch.long, device=prompts.device)).expand(len(prompts), -1, -1)
        return torch.cat([start, prompts], dim=1), torch.cat([mask.new_ones(len(prompts), len(head)), mask], dim=1)

    def _bos(self) -> list[int]:
        ids = self.tokenizer("", add_special_tokens=True).input_ids
        return list(ids)

    def _target_ids(self, prefix: str, target: str) -> list[int]:
        text = f" {target}" if prefix else target
        ids = self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_target_tokens]
        return [*ids, self.tokenizer.eos_token_id]

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, prompts: Tensor, prompt_mask: Tensor | None, prefixes: list[str], targets: list[str]) -> Tensor:
        prompts, prompt_mask = self._head(prompts, prompt_mask)
        num_prompts = prompts.shape[1]
        rows, labels, prefix_rows = [], [], []
        for prefix, target in zip(prefixes, targets, strict=True):
            p, t = self._prefix_ids(prefix), self._target_ids(prefix, target)
            prefix_rows.append(p)
            rows.append(p + t)
            labels.append([-100] * len(p) + t)
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        device = prompts.device
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=device)  # [B, L]
        text_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        label_t = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels], device=device)
        embeds = torch.cat([prompts, self._embed(ids)], dim=1)  # [B, M + L, D]
        mask = torch.cat([prompt_mask.to(text_mask.dtype), text_mask], dim=1)
        # Token t is predicted from position t - 1, so no position before the shortest prefix's last token predicts
        # a target: the vocabulary projection (a large share of a small LM's compute) skips the prompts and prefix.
        keep = min(length - min(len(p) for p in prefix_rows) + 1, num_prompts + length)  # last `keep` positions
        out = self.model(inputs_embeds=embeds, attention_mask=mask, **{self._keep_arg: keep} if self._keep_arg else {})
        logits = out.logits[:, -keep:]  # [B, keep, V]
        targets = label_t[:, length - keep + 1 :]  # [B, keep - 1]: what each kept position but the last predicts
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Tensor, prompt_mask: Tensor | None, prefixes: list[str]) -> list[str]:
        prompts, pmask = self._head(prompts, prompt_mask)
        batch, _, width = prompts.shape
        # Each row keeps only its real prompts, so the sequence ends on a real token even with an empty prefix.
        real = [prompts[i][pmask[i].bool()] for i in range(batch)]
        rows = [self._prefix_ids(p) for p in prefixes]
        length = max(len(r) + len(p) for r, p in zip(rows, real))
        device = prompts.device
        embeds = prompts.new_zeros(batch, length, width, dtype=self.dtype)  # left-padded [B, M + L, D]
        mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            start = length - len(real[i]) - len(row)
            embeds[i, start : start + len(real[i])] = real[i]
            if row:
                embeds[i, start + len(real[i]) :] = self._embed(torch.tensor(row, device=device))
            mask[i, start:] = 1
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **self.decoding.kwargs(),
        )
        # With inputs_embeds only, decoder-only generate returns the new tokens alone.
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
