"""Captioner on VQA data: weighted answer targets, the question read by the bridge, the blank-image baseline, and a
``vlgen test``-like run with a VQA task (its metric, decoding and submission file)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from vlgen.bridges import MLPProjector, QFormer
from vlgen.data import ImageTextDataModule, VQATask
from vlgen.encoders import TimmEncoder
from vlgen.errors import ConfigError
from vlgen.llms import CausalLM, Decoding
from vlgen.metrics import VQAAccuracy
from vlgen.models import Captioner

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}


def encoder() -> TimmEncoder:
    return TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)


@pytest.fixture
def llm(tiny_llm_dir):
    return CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=3))


def vqa_batch() -> dict:
    return {
        "pixels": torch.randn(2, 3, 32, 32),
        "captions": ["red", "two"],
        "references": [["red", "blue"], ["two"]],
        "ids": ["1", "2"],
        "num_skipped": 0,
        "prompts": ["question what colour short answer", "question how many short answer"],
        "targets": [["red", "blue"], ["two"]],
        "target_weights": [[0.8, 0.2], [1.0]],
    }


def test_weighted_targets_train_on_every_answer_with_its_share(llm):
    model = Captioner(encoder(), MLPProjector(), llm)
    model.eval()  # no dropout: the same prompts twice
    b = vqa_batch()
    out = model(b["pixels"])
    loss = model.lm_loss(out, b["prompts"], b)

    def one(i: int, target: str) -> torch.Tensor:
        return llm.loss(out.prompts[i : i + 1], None, [b["prompts"][i]], [target])

    by_hand = (0.8 * one(0, "red") + 0.2 * one(0, "blue") + 1.0 * one(1, "two")) / 2.0
    torch.testing.assert_close(loss, by_hand)
    plain = {k: v for k, v in b.items() if k not in ("targets", "target_weights")}
    assert not torch.allclose(model.lm_loss(out, b["prompts"], plain), loss)  # captions only: another loss


def test_blank_images_make_every_picture_alike(llm):
    model = Captioner(encoder(), MLPProjector(), llm, blank_images=True)
    a, b = model(torch.randn(1, 3, 32, 32)).prompts, model(torch.randn(1, 3, 32, 32)).prompts
    torch.testing.assert_close(a, b)
    seeing = Captioner(encoder(), MLPProjector(), llm)
    assert not torch.allclose(seeing(torch.randn(1, 3, 32, 32)).prompts, seeing(torch.randn(1, 3, 32, 32)).prompts)


def test_the_qformer_reads_the_question_when_asked(tiny_bert_dir, llm):
    with pytest.raises(ConfigError, match=r"model\.bridge_reads_prompts: MLPProjector cannot read text"):
        Captioner(encoder(), MLPProjector(), llm, bridge_reads_prompts=True)
    qformer = QFormer(str(tiny_bert_dir), num_queries=4, text_input=True, dropout=0.0)
    model = Captioner(encoder(), qformer, llm, bridge_reads_prompts=True)
    pixels = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    out = model(pixels, ["what colour is the circle", "how many shapes"])
    assert out.prompts.shape == (2, 4, 64)
    assert not torch.allclose(out.prompts[0], out.prompts[1])  # same picture, other question, other prompts
    torch.testing.assert_close(model(pixels[:1], ["how many shapes"]).prompts[0], out.prompts[1])
    model.training_losses({**vqa_batch(), "pixels": pixels})["lm_loss"].backward()
    assert qformer.embeddings["word_embeddings"].weight.grad is not None  # the question's tokens were read


def test_a_vqa_task_brings_its_metric_decoding_and_submission_file(tmp_path, llm):
    for k in range(3):
        Image.new("RGB", (32, 32), (40 * k, 0, 0)).save(tmp_path / f"{k}.png")
    records = [
        {"question_id": 100 + k, "question": f"What is {k}?", "image": f"{k}.png", "answer": ["x"] * 10,
         "answer_type": "other", "question_type": "what is"}
        for k in range(3)
    ]  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(records))
    task = VQATask(decoding=Decoding(max_new_tokens=2))
    dm = ImageTextDataModule(
        str(tmp_path), train_file=None, val_file=None, test_file="test.json", batch_size=2, num_workers=0, task=task
    )
    model = Captioner(encoder(), MLPProjector(), llm)
    seen: list = []
    generate = llm.generate
    llm.generate = lambda *a: seen.append(a[3]) or generate(*a)  # the decoding each call was given
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path / "run"),
                         enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.test(model, datamodule=dm)
    assert isinstance(model.test_metrics, VQAAccuracy) and seen and all(d is task.decoding for d in seen)
    run = tmp_path / "run"
    scores = json.loads((run / "metrics.json").read_text())
    assert set(scores) == {"accuracy", "answer_type=other", "question_type=what is", "skipped"}
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Question: what is {k}? Short answer:" for k in range(3)]
    expected = 100 * sum(r["caption"].strip().lower() == "x" for r in rows) / 3
    assert scores["accuracy"] == pytest.approx(expected)
    submission = json.loads((run / "vqa_submission.json").read_text())
    assert submission == [{"question_id": 100 + k, "answer": rows[k]["caption"]} for k in range(3)]
