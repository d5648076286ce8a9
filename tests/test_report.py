"""`vlgen report`: metrics, fact accuracy against a synthetic world's ground truth, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from vlgen.cli import main
from vlgen.data.synthetic import ShapesWorld
from vlgen.errors import ConfigError
from vlgen.report import fact_accuracy, render_report


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "shapes"
    ShapesWorld(seed=3, num_train=2, num_val=2, num_test=6, num_text=2).write(root)
    return root


def records_of(world):
    return json.loads((world / "test.json").read_text())


def write_run(run, rows, metrics=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))


def test_fact_accuracy_counts_captions_that_state_the_ground_truth(world):
    records = records_of(world)
    # The canonical caption states every fact; the first reference with its first colour swapped does not.
    rows = [{"id": r["image_id"], "caption": r["caption"][0]} for r in records[:4]]
    first = records[4]["facts"]["objects"][0]
    other = "purple" if first["color"] != "purple" else "red"
    wrong = records[4]["caption"][0].replace(first["color"], other)
    rows += [{"id": records[4]["image_id"], "caption": wrong}, {"id": records[5]["image_id"], "caption": "a dog"}]
    score = fact_accuracy(rows, world)
    assert (score.correct, score.total) == (4, 6)
    assert score.accuracy == pytest.approx(4 / 6)
    assert [score.right[r["id"]] for r in rows] == [True] * 4 + [False] * 2


def test_report_prints_metrics_facts_and_samples(world, tmp_path):
    records = records_of(world)
    rows = [{"id": r["image_id"], "caption": r["caption"][0], "references": r["caption"]} for r in records]
    rows[0]["caption"] = "a dog"
    write_run(tmp_path / "run", rows, {"CIDEr": 1.234, "Bleu_4": 0.5, "METEOR": 0.3})
    text = render_report(tmp_path / "run", world, samples=2)
    assert "CIDEr-D  1.234  (123.4 on the papers' x100 scale)" in text
    assert "Bleu_4   0.500" in text
    assert "fact accuracy  83.3%  (5 of 6 captions" in text
    assert f"{rows[0]['id']}  [facts wrong]\n    generated: a dog\n    reference: {records[0]['caption'][0]}" in text
    assert f"{rows[1]['id']}  [facts right]" in text and rows[2]["id"] not in text


def test_report_verb_and_its_errors(world, tmp_path, capsys):
    records = records_of(world)
    write_run(tmp_path / "run", [{"id": records[0]["image_id"], "caption": records[0]["caption"][0]}])
    main(["report", str(tmp_path / "run"), "--world", str(world)])
    assert "fact accuracy  100.0%  (1 of 1" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"predictions\.jsonl does not exist"):
        render_report(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="is not a synthetic world"):
        render_report(tmp_path / "run", tmp_path)
    write_run(tmp_path / "other", [{"id": "photo.jpg", "caption": "a red circle"}])
    with pytest.raises(ConfigError, match=r"1 predicted ids are not in .*test\.json, e\.g\. photo\.jpg"):
        render_report(tmp_path / "other", world)
