"""A tiny causal LM pre-trained on a synthetic world's text corpus: the frozen LLM of CPU tiny configs and tests.

Real frozen LLMs already know the language the captions are written in; a random tiny LM does not, and would make
CPU runs meaningless. This recipe gives the CPU tier the same situation in miniature: a word-level tokenizer and a
small Llama trained for about half a minute on the world's text corpus (never on images), written with
``save_pretrained`` so it is then loaded through the ordinary ``from_pretrained`` path. With ``questions``, half of
its training documents also end in a question about the scene and its answer, written as a VQA prompt reads
(``"Question: what color is the circle? Short answer: red"``): like a real LLM that has read question-answer text,
it then answers questions about a context it is given, which is what zero-shot VQA through soft prompts asks of it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from vlgen.data.synthetic.world import SyntheticWorld
from vlgen.errors import ConfigError
from vlgen.loading import ModelRecipe

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PROMPT_WORDS = "a photo of question what is the colour color shape short answer".split()


class ShapesTinyLM(ModelRecipe):
    """Write a synthetic world (if needed), then pre-train a small Llama on its text corpus.

    Args:
        world: the world (shapes, moving shapes, ...) whose ``corpus.txt`` is the training text.
        world_root: where that world lives (written there when missing).
        hidden_size: model width.
        num_layers: transformer layers.
        num_heads: attention heads.
        steps: optimiser steps of next-token training.
        batch_size: sentences per step.
        lr: AdamW learning rate.
        seed: initialisation and batching seed.
        questions: per unseen scene, this many of the world's questions (with their true answers) can close a
            document, in ``qa_template``; 0 trains on captions only (the default, and the LM of the caption configs).
        qa_template: how a question and its answer are written: ``{}`` is the question, cleaned as the VQA task
            cleans it, and the answer follows after a space (keep it the VQA task's ``prompt_template``).
    """

    def __init__(
        self,
        world: SyntheticWorld,
        world_root: str,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        steps: int = 1200,
        batch_size: int = 32,
        lr: float = 3e-3,
        seed: int = 0,
        questions: int = 0,
        qa_template: str = "Question: {} Short answer:",
    ) -> None:
        if questions and not hasattr(world, "questions"):
            raise ConfigError(f"llm.build_if_missing.questions: a {world.kind} world asks no questions")
        self.questions, self.qa_template = questions, qa_template
        self.world, self.world_root = world, Path(world_root)
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.steps, self.batch_size, self.lr, self.seed = steps, batch_size, lr, seed

    def _qa_lines(self, index: int) -> list[str]:
        """Question-answer lines about unseen scene ``index`` of the corpus (the world's ``text`` split)."""
        from vlgen.data.vqa import clean_question  # not at import: vlgen.data imports this package

        asked = self.world.questions("text", index)[: self.questions]  # type: ignore[attr-defined]
        return [f"{self.qa_template.format(clean_question(q.question))} {q.answer}" for q in asked]

    def build(self, out_dir: Path) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        self.world.write(self.world_root)
        sentences = (self.world_root / "corpus.txt").read_text().split("\n")
        sentences = [s for s in sentences if s.strip()]
        per_scene = self.world.captions_per_scene
        # The corpus lists each unseen scene's phrasings in a row: a "document" of 2-3 of them teaches the LM to
        # read its context (later phrasings repeat earlier colours and shapes), which soft prompts then exploit.
        # Single-sentence documents teach nothing about context and halve how fast that skill is learnt.
        documents = [sentences[i : i + per_scene] for i in range(0, len(sentences) - per_scene + 1, per_scene)]
        qa = [self._qa_lines(k) for k in range(len(documents))] if self.questions else [[] for _ in documents]
        pre = pre_tokenizers.Whitespace()
        text = sentences + [line for lines in qa for line in lines]
        words = sorted({w for s in text for w, _ in pre.pre_tokenize_str(s)} | set(PROMPT_WORDS))
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre
        bos_id = SPECIALS.index("<s>")
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        # Tokenised once: per-step tokenisation would cost more than the model's own steps.
        documents = [[tok(s, add_special_tokens=False).input_ids for s in doc] for doc in documents]
        qa_ids = [[tok(s, add_special_tokens=False).input_ids for s in lines] for lines in qa]
        torch.manual_seed(self.seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=self.hidden_size,
            intermediate_size=self.hidden_size * 2,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(self.seed)
        loss = torch.tensor(float("nan"))
        for step in range(self.steps):
            pick = torch.randint(len(documents), (self.batch_size,), generator=gen).tolist()
            rows = []
            for i in pick:  # 2-3 phrasings of one scene, in random order
                count = int(torch.randint(2, 4, (1,), generator=gen))
                row = [tok.bos_token_id]
                for j in torch.randperm(len(documents[i]), generator=gen)[:count].tolist():
                    row += [*documents[i][j], tok.eos_token_id]
                if qa_ids[i] and bool(torch.rand((), generator=gen) < 0.5):  # then a question and its answer
                    row += [*qa_ids[i][int(torch.randint(len(qa_ids[i]), (), generator=gen))], tok.eos_token_id]
                rows.append(row)
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # [B, L]
            mask = (ids != tok.pad_token_id).long()
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            for group in opt.param_groups:  # linear decay to zero
                group["lr"] = self.lr * (1 - (step + 1) / self.steps)
        log.info("tiny LM: %d steps on %d sentences, final loss %.3f", self.steps, len(text), loss.item())
        partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(out_dir)
