"""How well the frozen tiny QA LM answers the world's questions from text: the ceiling of zero-shot VQA through it.

A soft-prompt bridge can at best make the LM read the picture as if it were the picture's caption. This gives the
LM the true canonical caption of each test image as its context sentence (as ``prompt_layout: sentence`` places the
prompts: ``<s> CAPTION </s> Question: ... Short answer:``), then no context at all, and scores both answers with
the official VQA accuracy against the ten annotators:

    python bench/tiny_qa_lm.py [--steps 1200] [--questions 3] [--seeds 0 1 2] [--images 200]

Each seed pre-trains an LM from scratch into a temporary folder (about a minute each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vlgen.data.synthetic import ShapesWorld
from vlgen.data.synthetic.tiny_lm import ShapesTinyLM
from vlgen.data.vqa import clean_question
from vlgen.metrics import VQAAccuracy

TEMPLATE = "Question: {} Short answer:"


def answer(model, tok, contexts: list[str | None], questions: list[str]) -> list[str]:
    """Greedy answers (at most 10 tokens), one prompt at a time (no padding questions)."""
    out = []
    for context, question in zip(contexts, questions, strict=True):
        ids = [tok.bos_token_id]
        if context is not None:
            ids += [*tok(context, add_special_tokens=False).input_ids, tok.eos_token_id]
        ids += tok(TEMPLATE.format(clean_question(question)), add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        out.append(tok.decode(gen[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", type=int, default=200, help="test images whose questions are asked")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = ShapesWorld(seed=0, num_train=10, num_val=2, num_test=args.images, num_text=20000)
        root = world.write(Path(tmp) / "world")
        asked = [(world.scene("test", i)[1][0], q) for i in range(args.images) for q in world.questions("test", i)]
        for seed in args.seeds:
            out = Path(tmp) / f"lm{seed}"
            ShapesTinyLM(world, str(root), steps=args.steps, questions=args.questions, seed=seed).build(out)
            model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
            for name, contexts in (("caption", [c for c, _ in asked]), ("none", [None] * len(asked))):
                preds = answer(model, tok, contexts, [q.question for _, q in asked])
                metric = VQAAccuracy()
                metric.update(preds, [list(q.answers) for _, q in asked],
                              answer_types=[q.answer_type for _, q in asked])  # fmt: skip
                scores = metric.compute()
                types = "  ".join(f"{k.split('=')[1]} {v:.1f}" for k, v in scores.items() if k != "accuracy")
                print(f"seed {seed} steps {args.steps} context {name:<8} accuracy {scores['accuracy']:.1f}  ({types})")


if __name__ == "__main__":
    main()
