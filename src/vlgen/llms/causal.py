"""A decoder-only Hugging Face LM (``AutoModelForCausalLM``) that reads soft prompts.

Training input is ``[prompts][prefix tokens][target tokens][eos]``, each row's real prompts only, padded on the right
(BLIP-2's layout with OPT: the prefix keeps its BOS), or with ``prompt_layout: sentence``
``[bos][prompts][eos][prefix tokens][target tokens][eos]``, where the prompts stand where an earlier sentence of the
document would; the loss covers the target tokens and the end-of-sequence token only. Generation input is the same
without the target, padded on the left so every sequence ends at the last position (position ids then follow the
attention mask, as ``generate`` expects). A ``context`` text goes before the prompts in either layout (after the BOS
in ``sentence``). A chat model can instead build the turn with its tokenizer's own chat template (``chat_template:
true``): the visual prompts open the user message, the prefix text (the model's prompt, a question) follows them, and
the target is the assistant's answer, closed by the template's end-of-turn token, as LLaVA-style models place the
picture inside a user message."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal

import torch
import transformers
from torch import Tensor

from vlgen.errors import ConfigError
from vlgen.interfaces import all_real
from vlgen.llms.decoding import Decoding
from vlgen.llms.hf import HFLanguageModel, target_loss
from vlgen.loading import DType, ModelRecipe, own_precision
from vlgen.lora import LoRA


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
        chat_template: lay out each sample as one user turn of the tokenizer's chat template (visual prompts, then
            the prefix text) followed by the assistant's answer; needs a tokenizer with a chat template and excludes
            ``context`` and the ``sentence`` layout.
        system: the system message of that turn; ``None`` keeps whatever the template adds by itself (some add a
            default one), ``""`` an empty one.
        lora: LoRA adapters (:class:`~vlgen.lora.LoRA`: ``{r: 8, alpha: 16, dropout: 0.05, target_modules:
            all-linear}``) on the frozen LM: only they train (with the bridge) and only they are saved in
            checkpoints; needs ``frozen: true`` and the peft package. The LM stays in eval mode; the adapters'
            dropout acts in training.
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
        chat_template: bool = False,
        system: str | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__(name_or_path, gguf_file, dtype, frozen, decoding, max_target_tokens, build_if_missing, lora)
        self.prompt_layout = prompt_layout
        self.context = context
        self.chat = ChatTurn(self.tokenizer, system, name_or_path) if chat_template else None
        if self.chat is not None and (context or prompt_layout == "sentence"):
            raise ConfigError(
                "llm.chat_template builds the turn itself: leave llm.context empty and the prepend layout"
            )
        if self.chat is not None:
            context = self.chat.head
        self._context_ids: list[int] = self.tokenizer(context, add_special_tokens=False).input_ids if context else []
        self._head_cache: tuple[Any, Any] | None = None  # (device, dtype, autocast), the constant head's keys/values
        # HF causal LMs can project only the last positions to the vocabulary (the name changed in 4.50).
        params = inspect.signature(self.model.forward).parameters
        self._keep_arg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)

    # --- tokenisation -------------------------------------------------------------------------------------------
    def _prefix_ids(self, prefix: str) -> list[int]:
        if self.chat is not None:  # the rest of the user turn and the assistant's opening
            return self.tokenizer(self.chat.tail(prefix), add_special_tokens=False).input_ids
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
        text = f" {target}" if prefix and self.chat is None else target  # a chat answer opens a new line
        ids = self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_target_tokens]
        return [*ids, self.tokenizer.eos_token_id]

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    # --- training -----------------------------------------------------------------------------------------------
    def loss(
        self,
        prompts: Tensor,
        prompt_mask: Tensor | None,
        prefixes: list[str],
        targets: list[str],
        weights: Tensor | None = None,
    ) -> Tensor:
        prompts, prompt_mask = self._head(prompts, prompt_mask)
        batch, _, width = prompts.shape
        # Each row keeps only its real prompts, as in generation: padded prompts are neither read nor counted in
        # the positions, so a sample's loss does not depend on how many prompts its batch neighbours have.
        real = [prompts[i][prompt_mask[i].bool()] for i in range(batch)]  # [M_i, D] each
        rows, starts = [], []  # text ids per row; where each row's first target token sits
        for i, (prefix, target) in enumerate(zip(prefixes, targets, strict=True)):
            p, t = self._prefix_ids(prefix), self._target_ids(prefix, target)
            rows.append(p + t)
            starts.append(len(real[i]) + len(p))
        length = max(len(r) + len(x) for r, x in zip(rows, real))  # [real prompts][prefix][target], right-padded
        device = prompts.device
        pad = self.tokenizer.pad_token_id
        width_text = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width_text - len(r)) for r in rows], device=device)  # [B, T]
        text = self._embed(ids)  # [B, T, D]
        embeds = prompts.new_zeros(batch, length, width, dtype=self.dtype)  # [B, L, D]
        mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        labels = torch.full((batch, length), -100, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            m = len(real[i])
            embeds[i, :m] = real[i]
            embeds[i, m : m + len(row)] = text[i, : len(row)]
            mask[i, : m + len(row)] = 1
            labels[i, starts[i] : m + len(row)] = ids[i, starts[i] - m : len(row)]
        # Token t is predicted from position t - 1, so no position before the earliest first target predicts one:
        # the vocabulary projection (a large share of a small LM's compute) skips the prompts and prefixes.
        keep = length - min(starts) + 1  # the last `keep` positions
        kept = {self._keep_arg: keep} if self._keep_arg else {}
        with own_precision(self.dtype, device):
            past = self._constant_head(batch, device) if self._head_cacheable() else None
            if past is not None:  # the head's keys and values are the same in every row and every step
                start = past.get_seq_length()
                out = self.model(inputs_embeds=embeds[:, start:], attention_mask=mask, past_key_values=past, **kept)
            else:  # no key-value cache: one pass needs none
                out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **kept)
        logits = out.logits[:, -keep:]  # [B, keep, V]
        shifted = labels[:, length - keep + 1 :]  # [B, keep - 1]: what each kept position but the last predicts
        return target_loss(logits[:, :-1], shifted, weights)

    def _head_cacheable(self) -> bool:
        """Whether the text before the prompts can be read once for all steps: a frozen LM without adapters (its
        keys and values for that text never change) whose layers are not activation-checkpointed (a replayed layer
        would append its keys to the cache a second time)."""
        if not self._context_ids or self.prompt_layout != "prepend" or not self.frozen or self.lora is not None:
            return False
        if getattr(self.model, "is_gradient_checkpointing", False):
            return False
        try:
            from torch.distributed._composable.contract import _get_registry
        except ImportError:  # where torch moved it: no cache rather than a wrong one
            return False
        return not any("checkpoint" in (_get_registry(m) or {}) for m in self.model.modules())

    def _constant_head(self, batch: int, device: torch.device) -> Any:
        """A fresh key-value cache holding the head (``context`` or the chat template's opening) for ``batch`` rows;
        the head itself is run once per device, dtype and autocast setting (the cached keys' dtype follows it)."""
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        key = (device, self.dtype, autocast)
        if self._head_cache is None or self._head_cache[0] != key:
            with torch.no_grad():
                ids = torch.tensor([self._context_ids], device=device)
                out = self.model(inputs_embeds=self._embed(ids), use_cache=True)
            self._head_cache = (key, out.past_key_values)
        cache = copy.deepcopy(self._head_cache[1])  # the forward appends the row's own keys to it
        cache.batch_repeat_interleave(batch)
        return cache

    # --- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: Tensor, prompt_mask: Tensor | None, prefixes: list[str], decoding: Decoding | None = None
    ) -> list[str]:
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
        with own_precision(self.dtype, device):
            out = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **self.generate_kwargs(decoding),
            )
        # With inputs_embeds only, decoder-only generate returns the new tokens alone.
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class ChatTurn:
    """One user turn of a tokenizer's chat template with the visual prompts first, split where they go.

    The template is rendered with a placeholder in place of the prompts: the text before it (:attr:`head`, the same
    for every sample) precedes the prompts, and the text after it (:meth:`tail`: the sample's prefix, the end of the
    turn and the assistant's opening) follows them.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        system: the system message (``None``: whatever the template adds by itself).
        name: the model, for the error when the tokenizer has no template.
    """

    PLACEHOLDER = "<<vlgen-visual-prompts>>"

    def __init__(self, tokenizer: Any, system: str | None, name: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"llm.chat_template: the tokenizer of {name} has no chat template")
        self.tokenizer, self.system = tokenizer, system
        self.head = self._render("").split(self.PLACEHOLDER)[0]
        self._tails: dict[str, str] = {}

    def _render(self, prefix: str) -> str:
        turns = [] if self.system is None else [{"role": "system", "content": self.system}]
        turns.append({"role": "user", "content": self.PLACEHOLDER + prefix})
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if text.count(self.PLACEHOLDER) != 1:
            raise ConfigError("llm.chat_template: the template does not keep the user message as written")
        return text

    def tail(self, prefix: str) -> str:
        """The text after the visual prompts for ``prefix`` (cached: most runs use few distinct prefixes)."""
        if prefix not in self._tails:
            self._tails[prefix] = self._render(prefix).split(self.PLACEHOLDER)[1]
        return self._tails[prefix]
