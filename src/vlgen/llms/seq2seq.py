"""An encoder-decoder Hugging Face LM (``AutoModelForSeq2SeqLM``) that reads soft prompts, the BLIP-2 Flan-T5 way.

The encoder reads ``[prompts][prefix tokens]`` (the prefix as the tokenizer encodes it, so T5 closes it with its
own ``</s>``; an empty prefix leaves the prompts alone), padded on the right with an attention mask. The decoder
is trained to produce ``[target tokens][eos]``; the loss covers those tokens only. T5's relative positions and the
decoder's causal mask make each sample's result independent of how much padding its batch neighbours add. With
``prefix_lm`` the caption itself is split at a random word in training: the first part joins the encoder's text
and the rest becomes the target (BLIP-2's stage-2 objective for encoder-decoder LMs).
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor

from vlgen.interfaces import all_real
from vlgen.llms.decoding import Decoding
from vlgen.llms.hf import HFLanguageModel, target_loss
from vlgen.loading import DType, ModelRecipe, own_precision
from vlgen.lora import LoRA


class Seq2SeqLM(HFLanguageModel):
    """Any ``AutoModelForSeq2SeqLM`` (Flan-T5, T5, BART ...) behind the vlgen interface.

    Args:
        name_or_path: hub id, local directory (``save_pretrained`` layout) or ``pkg:PACKAGE`` (a package that
            ships model files).
        gguf_file: a GGUF file inside ``name_or_path``; dequantised once and cached as safetensors.
        dtype: weights' dtype (prompts are cast to it; the loss is computed in float32). Flan-T5 wants float32
            or bfloat16: float16 overflows in its feed-forward layers.
        frozen: keep every LM parameter fixed (the usual setting); false fine-tunes the LM too.
        decoding: generation settings.
        max_target_tokens: targets longer than this are truncated in training (the end-of-sequence token is kept).
        max_prefix_tokens: encoder text longer than this is truncated (the tokenizer's special tokens are kept).
        prefix_lm: in training, move the first ``k`` words of each target (``k`` drawn uniformly from 0 to the
            number of words minus one, so at least one word stays the target) to the end of the prefix.
        prefix_lm_seed: seed of the generator that draws the prefix-LM split points (reproducible runs).
        build_if_missing: a recipe that writes the model to ``name_or_path`` when that path does not exist.
        lora: LoRA adapters (:class:`~vlgen.lora.LoRA`: ``{r: 8, alpha: 16, dropout: 0.05, target_modules:
            all-linear}``) on the frozen LM: only they train (with the bridge) and only they are saved in
            checkpoints; needs ``frozen: true`` and the peft package. The LM stays in eval mode; the adapters'
            dropout acts in training.
    """

    auto_class = transformers.AutoModelForSeq2SeqLM

    def __init__(
        self,
        name_or_path: str,
        gguf_file: str | None = None,
        dtype: DType = "float32",
        frozen: bool = True,
        decoding: Decoding | None = None,
        max_target_tokens: int = 64,
        max_prefix_tokens: int = 64,
        prefix_lm: bool = False,
        prefix_lm_seed: int = 0,
        build_if_missing: ModelRecipe | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__(name_or_path, gguf_file, dtype, frozen, decoding, max_target_tokens, build_if_missing, lora)
        self.max_prefix_tokens = max_prefix_tokens
        self.prefix_lm = prefix_lm
        self.generator = torch.Generator().manual_seed(prefix_lm_seed)
        # Whether the owner is in train mode (a fresh module is): a frozen LM's own `training` flag stays False.
        self._fitting = True

    def train(self, mode: bool = True) -> Seq2SeqLM:
        self._fitting = mode
        super().train(mode)
        return self

    # --- tokenisation -------------------------------------------------------------------------------------------
    def _prefix_ids(self, prefix: str) -> list[int]:
        if not prefix:
            return []
        return list(self.tokenizer(prefix, truncation=True, max_length=self.max_prefix_tokens).input_ids)

    def _target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(target, add_special_tokens=False).input_ids[: self.max_target_tokens]
        return [*ids, self.tokenizer.eos_token_id]

    def _split(self, prefix: str, target: str) -> tuple[str, str]:
        """Prefix-LM: the first ``k`` words of ``target`` join ``prefix``; at least one word stays the target."""
        words = target.split()
        if len(words) < 2:
            return prefix, target
        k = int(torch.randint(len(words), (), generator=self.generator))
        return " ".join([prefix, *words[:k]]).strip(), " ".join(words[k:])

    def _encoder_inputs(
        self, prompts: Tensor, prompt_mask: Tensor | None, rows: list[list[int]]
    ) -> tuple[Tensor, Tensor]:
        """``[prompts][prefix ids]`` right-padded -> ``(embeds [B, M + L, D], mask [B, M + L])``."""
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        device = prompts.device
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long, device=device)  # [B, L]
        text_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        text = self.model.get_input_embeddings()(ids).to(self.dtype)  # [B, L, D]
        embeds = torch.cat([prompts.to(self.dtype), text], dim=1)  # [B, M + L, D]
        mask = torch.cat([all_real(prompt_mask, prompts).to(torch.long), text_mask.to(torch.long)], dim=1)
        return embeds, mask

    # --- training -----------------------------------------------------------------------------------------------
    def loss(
        self,
        prompts: Tensor,
        prompt_mask: Tensor | None,
        prefixes: list[str],
        targets: list[str],
        weights: Tensor | None = None,
    ) -> Tensor:
        if self.prefix_lm and self._fitting:
            prefixes, targets = map(list, zip(*map(self._split, prefixes, targets), strict=True))
        embeds, mask = self._encoder_inputs(prompts, prompt_mask, [self._prefix_ids(p) for p in prefixes])
        labels = [self._target_ids(t) for t in targets]
        length = max(len(lab) for lab in labels)
        label_t = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels], device=prompts.device)  # [B, T]
        # Given labels, the model builds its decoder input by shifting them right behind its start token. No cache: a
        # checkpointed decoder block replayed in the backward would write its keys into it twice.
        with own_precision(self.dtype, embeds.device):
            out = self.model(inputs_embeds=embeds, attention_mask=mask, labels=label_t, use_cache=False)
        logits = out.logits  # [B, T, V]
        return target_loss(logits, label_t, weights)

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: Tensor, prompt_mask: Tensor | None, prefixes: list[str], decoding: Decoding | None = None
    ) -> list[str]:
        embeds, mask = self._encoder_inputs(prompts, prompt_mask, [self._prefix_ids(p) for p in prefixes])
        with own_precision(self.dtype, embeds.device):
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **self.generate_kwargs(decoding),
            )
        # Encoder-decoder generate returns the decoder start token first; it is a special token and is dropped.
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
