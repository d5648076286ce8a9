"""VQA end to end with the `vlgen` command on the tiny world's questions: fine-tune (configs/tiny/vqa.yaml), test,
report; zero-shot VQA of a caption-trained model (configs/tiny/linear_qa.yaml with the VQA data on the command line),
and the blank-picture baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

from vlgen.metrics import VQAAccuracy

TINY = REPO / "configs" / "tiny"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small world with questions, a quickly pre-trained tiny encoder and question-reading tiny LM."""
    work = tmp_path_factory.mktemp("vqa")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    lm = tiny_lm(work, world, steps=200)
    lm["build_if_missing"]["init_args"]["questions"] = 3
    override = {
        "trainer": {"max_steps": 30, "limit_val_batches": 1, "log_every_n_steps": 5},
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(work, world)},
                "llm": {"init_args": lm},
                "optim": {"warmup_steps": 5},
            }
        },
        "data": {"init_args": {"root": str(work / "shapes"), "generate": world, "batch_size": 16, "num_workers": 0}},
    }
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    return work


def rescored(run: Path) -> float:
    """VQA accuracy recomputed from the run's predictions.jsonl (its answers and the annotators')."""
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    metric = VQAAccuracy()
    metric.update([r["caption"] for r in rows], [r["references"] for r in rows], ids=[r["id"] for r in rows])
    return metric.compute()["accuracy"]


@pytest.mark.slow
def test_fine_tune_test_and_report(workdir):
    override = ["--config", str(workdir / "override.yaml")]
    vlgen("fit", "--config", str(TINY / "vqa.yaml"), *override, cwd=workdir)
    ckpt = run_dirs(workdir)[-1] / "checkpoints" / "last.ckpt"
    vlgen("test", "--config", str(TINY / "vqa.yaml"), *override, "--ckpt_path", str(ckpt), cwd=workdir)
    run = run_dirs(workdir)[-1]
    scores = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "answer_type=yes/no", "answer_type=number", "answer_type=other"} <= set(scores)
    assert scores["accuracy"] == pytest.approx(rescored(run), abs=1e-9)
    submitted = json.loads((run / "vqa_submission.json").read_text())
    questions = json.loads((workdir / "shapes" / "vqa_test.json").read_text())
    assert sorted(a["question_id"] for a in submitted) == sorted(q["question_id"] for q in questions)
    report = vlgen("report", str(run), "--samples", "2", cwd=workdir).stdout
    assert f"VQA accuracy  {scores['accuracy']:.2f}%" in report and "annotators:" in report


@pytest.mark.slow
def test_zero_shot_and_blank_baseline_of_a_captioner(workdir):
    caption = ["--config", str(TINY / "linear_qa.yaml"), "--config", str(workdir / "override.yaml")]
    vlgen("fit", *caption, "--trainer.max_steps", "10", cwd=workdir)
    ckpt = run_dirs(workdir)[-1] / "checkpoints" / "last.ckpt"
    # The VQA data replaces the caption data; the override after it points it at this test's world.
    vqa = ["--config", str(TINY / "linear_qa.yaml"), "--data", str(TINY / "parts" / "vqa_data.yaml")]
    vqa += ["--config", str(workdir / "override.yaml"), "--ckpt_path", str(ckpt)]
    vlgen("test", *vqa, cwd=workdir)
    seeing = run_dirs(workdir)[-1]
    vlgen("test", *vqa, "--model.init_args.blank_images", "true", cwd=workdir)
    blank = run_dirs(workdir)[-1]
    for run in (seeing, blank):
        rows = (run / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == WORLD["num_test"] * 3  # three questions per test image
        assert json.loads((run / "metrics.json").read_text())["accuracy"] == pytest.approx(rescored(run), abs=1e-9)
    by_question: dict[str, list[str]] = {}
    for line in (blank / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_question.setdefault(row["prompt"], []).append(row["caption"])
    assert any(len(asked) > 1 for asked in by_question.values())  # a question asked of several pictures ...
    assert all(len(set(answers)) == 1 for answers in by_question.values())  # ... gets one answer: it sees no picture
