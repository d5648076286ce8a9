"""The P-Former (arXiv 2307.07063): a sentence -> the soft prompts a frozen LLM needs to say it.

A BERT-style text encoder reads the sentence; its sentence embedding (the [CLS] output, as in the paper, or the mean
token output for sentence encoders trained that way) is expanded by one linear layer to ``num_prompts`` vectors of
the encoder's width, passed through ``Linear + Tanh`` and projected to the LLM width: prompts ``[B, P, Dllm]``, the
shape a bridge gives. It is used twice from this one module: trained on text alone in stage 0
(:class:`~vlgen.models.PFormerStage0`, which calls :meth:`PFormer.build` with its LLM's width), then frozen as the
teacher whose prompts a vision bridge is pulled towards (:class:`~vlgen.models.PromptAlignment`), loaded from the
stage-0 checkpoint with ``init_from``. Parameter names: ``bert.*`` (the text encoder), ``expand``, ``pooler``,
``llm_proj`` (the reference's ``cls_proj``, ``pooler``, ``opt_proj``).
"""

from __future__ import annotations

from typing import Literal

import transformers
from torch import Tensor, nn

from vlgen.errors import ConfigError, load_failure
from vlgen.interfaces import HasBlocks, masked_mean, no_split_blocks, set_frozen
from vlgen.loading import dtype_kwarg, load_checked, read_checkpoint, rename_keys, resolve_name_or_path


class PFormer(HasBlocks):
    """Sentences -> ``num_prompts`` soft prompts of the LLM's width.

    Args:
        bert: a BERT-style encoder checkpoint (hub id such as ``bert-base-uncased``, local directory or
            ``pkg:NAME[/SUBDIR]``) giving the layers and the tokenizer.
        num_prompts: prompts per sentence; must equal the prompt count of the bridge it teaches.
        num_layers: keep only the first ``num_layers`` encoder layers (all by default).
        dropout: hidden and attention dropout of the encoder; its own values by default.
        pooling: the sentence embedding: the ``cls`` output (the paper, for BERT) or the ``mean`` of the token
            outputs (for sentence encoders trained with mean pooling, such as MiniLM, whose [CLS] barely varies).
        max_text_len: sentences are truncated to this many encoder tokens.
        frozen: keep every weight fixed and the module in eval mode (the alignment teacher).
        init_from: a P-Former stage-0 Lightning checkpoint whose ``pformer.`` weights are loaded by :meth:`build`.
    """

    def __init__(
        self,
        bert: str,
        num_prompts: int = 32,
        num_layers: int | None = None,
        dropout: float | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        max_text_len: int = 32,
        frozen: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ConfigError(f"pformer.num_prompts must be >= 1, got {num_prompts}")
        path = resolve_name_or_path(bert, "pformer.bert")
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            if num_layers is not None and not 1 <= num_layers <= config.num_hidden_layers:
                raise ConfigError(
                    f"pformer.num_layers must be in 1..{config.num_hidden_layers} for {bert}, got {num_layers}"
                )
            config.num_hidden_layers = num_layers or config.num_hidden_layers
            if dropout is not None:
                config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
            self.bert = transformers.AutoModel.from_pretrained(path, config=config, **dtype_kwarg("float32"))
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"pformer.bert: cannot load {bert!r}: {load_failure(err)}") from None
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler = None  # BERT's NSP pooler is unused: no gradient would reach it (DDP refuses that)
        if max_text_len > config.max_position_embeddings:
            raise ConfigError(
                f"pformer.max_text_len ({max_text_len}) exceeds {bert}'s max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        hidden = int(config.hidden_size)
        self.num_prompts, self.pooling, self.max_text_len = num_prompts, pooling, max_text_len
        self.frozen, self.init_from = frozen, init_from
        self.expand = nn.Linear(hidden, num_prompts * hidden)
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.llm_proj: nn.Linear | None = None  # created by build()

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def llm_dim(self) -> int | None:
        """The LLM width the prompts have (None before :meth:`build`)."""
        return None if self.llm_proj is None else self.llm_proj.out_features

    def build(self, llm_dim: int | None = None) -> None:
        """Create the projection to ``llm_dim``, load ``init_from`` and freeze when asked.

        ``llm_dim=None`` (BLIP-2 stage 1, no LLM) takes the width from the ``init_from`` checkpoint.
        """
        state = read_stage0(self.init_from) if self.init_from is not None else None
        if llm_dim is None:
            if state is None or "llm_proj.weight" not in state:
                raise ConfigError("pformer.init_from: a stage-0 checkpoint is needed to know the LLM width here")
            llm_dim = int(state["llm_proj.weight"].shape[0])
        self.llm_proj = nn.Linear(self.hidden_size, llm_dim)
        if state is not None:  # every weight, with this P-Former's shapes
            hint = "check num_prompts, num_layers, the BERT and the LLM width"
            load_checked(self, state, "pformer.init_from", str(self.init_from), label="P-Former", hint=hint)
        set_frozen(self, self.frozen, "P-Former")

    def block_modules(self) -> list[nn.Module]:
        """The text encoder's blocks: the classes its ``_no_split_modules`` names (a BERT's embeddings and layers)."""
        return no_split_blocks(self.bert)

    def train(self, mode: bool = True) -> PFormer:
        super().train(mode and not self.frozen)  # a frozen P-Former stays in eval mode (dropout off)
        return self

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, each ``[B, T]``, padded to the longest sentence."""
        out = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        device = self.expand.weight.device
        return out["input_ids"].to(device), out["attention_mask"].to(device)

    def sentence_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence embeddings ``[B, H]`` of token ids ``[B, T]`` (the contrastive head of stage 0 reads them)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        if self.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask)  # [B, T, H] -> [B, H]

    def to_prompts(self, features: Tensor) -> Tensor:
        """Sentence embeddings ``[B, H]`` -> prompts ``[B, P, Dllm]``."""
        if self.llm_proj is None:
            raise RuntimeError("PFormer.build(llm_dim) must be called before making prompts")
        x = self.expand(features).unflatten(-1, (self.num_prompts, self.hidden_size))  # [B, P*H] -> [B, P, H]
        return self.llm_proj(self.pooler(x))  # [B, P, H] -> [B, P, Dllm]

    def forward(self, texts: list[str]) -> Tensor:
        """Prompts ``[B, P, Dllm]`` for ``B`` sentences."""
        return self.to_prompts(self.sentence_features(*self.tokenize(texts)))


def stage0_key_to_pformer(key: str) -> str | None:
    """The P-Former key a stage-0 checkpoint tensor loads into: its ``pformer.`` weights, prefix removed."""
    return key[len("pformer.") :] if key.startswith("pformer.") else None


def read_stage0(ckpt_path: str) -> dict[str, Tensor]:
    """The ``pformer.`` weights of a stage-0 Lightning checkpoint under P-Former names."""
    ckpt = read_checkpoint(ckpt_path, "pformer.init_from")
    state = rename_keys(ckpt.get("state_dict", {}), stage0_key_to_pformer)
    if not state:
        raise ConfigError(f"pformer.init_from: {ckpt_path} holds no pformer.* weights (not a P-Former stage-0 run)")
    return state
