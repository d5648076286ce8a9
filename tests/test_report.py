"""`vlgen report`: metrics, fact accuracy against a synthetic world's ground truth, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from vlgen.cli import main
from vlgen.data.synthetic import ShapesWorld
from vlgen.errors import ConfigError
from vlgen.report import fact_accuracy, render_report
from vlgen.report import main as report


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


# --- fit runs, --curves and the gallery ---------------------------------------------------------------------------
def write_metrics_csv(run, losses, cider):
    """A fit run's metrics.csv as Lightning's CSVLogger writes it: sparse rows, empty cells for what was not logged."""
    run.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train/grounding_gap,train/loss,val/CIDEr"]
    lines += [f"0,{step},,{loss}," for step, loss in losses.items()]
    lines += [f",{max(losses)},0.125,,"] if losses else []  # the grounding monitor's row of its own
    lines += [f"0,{step},,,{score}" for step, score in cider.items()]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.format, image.size


def test_curves_of_a_fit_run_and_its_summary(tmp_path, capsys):
    run = write_metrics_csv(tmp_path / "vlgen" / "version_0", {1: 2.5, 3: 1.25, 5: 1.5}, {4: 0.25, 9: 0.75, 14: 0.5})
    main(["report", str(tmp_path / "vlgen"), "--curves"])  # a parent of version_* runs: its latest
    out = capsys.readouterr().out
    assert f"run: {run}  (a fit run: no predictions.jsonl)" in out
    assert "training: last step 14 (epoch 0)" in out
    assert "train/loss             last 1.5000 (step 5)  min 1.2500 (step 3)" in out
    assert "train/grounding_gap    last 0.1250 (step 5)" in out
    assert "val/CIDEr              best 0.7500 (step 9)  last 0.5000 (step 14)" in out
    assert out.rstrip().endswith(f"curves: {tmp_path / 'vlgen' / 'curves.png'}")
    assert png_size(tmp_path / "vlgen" / "curves.png")[0] == "PNG"
    (tmp_path / "vlgen" / "curves.png").unlink()
    main(["report", "--curves", str(tmp_path / "vlgen")])  # the flag before the directory: not its value
    assert (tmp_path / "vlgen" / "curves.png").is_file()
    main(["report", str(run)])  # without --curves: the summary, and where the curves would come from
    out = capsys.readouterr().out
    assert "min 1.2500 (step 3)" in out and "(--curves draws the training curves into curves.png)" in out
    assert not (run / "curves.png").exists()
    main(["report", str(run), "--curves", str(tmp_path / "figs" / "mine.png")])
    assert capsys.readouterr().out.rstrip().endswith(f"curves: {tmp_path / 'figs' / 'mine.png'}")
    assert png_size(tmp_path / "figs" / "mine.png")[0] == "PNG"


def test_curves_of_a_test_run_come_from_its_checkpoint_s_training_run(world, tmp_path, capsys, monkeypatch):
    records = records_of(world)
    fit = write_metrics_csv(tmp_path / "runs" / "vlgen" / "version_0", {1: 2.0, 3: 1.0}, {2: 0.5})
    test = tmp_path / "runs" / "vlgen" / "version_1"
    write_run(test, [{"id": records[0]["image_id"], "caption": records[0]["caption"][0]}], {"CIDEr": 0.5})
    (test / "metrics.csv").write_text("epoch,step,test/CIDEr\n0,0,0.5\n")  # what `vlgen test` logs
    # The path as `vlgen test` was given it, relative to the working directory it ran in (not this one).
    (test / "config.yaml").write_text("ckpt_path: runs/vlgen/version_0/checkpoints/last.ckpt\n")
    (test / "gallery.html").write_text("<html></html>")
    monkeypatch.chdir(world)
    main(["report", str(test), "--curves"])
    out = capsys.readouterr().out
    assert "CIDEr-D  0.500" in out and f"gallery: {test / 'gallery.html'}" in out
    assert f"training log: {fit / 'metrics.csv'}  (the run its checkpoint came from)" in out
    assert out.rstrip().endswith(f"curves: {test / 'curves.png'}")
    fmt, (width, height) = png_size(test / "curves.png")
    assert fmt == "PNG" and width > 0 and height > 0
    # Several runs, one figure; a test run without a findable training run is one line.
    main(["report", str(fit), str(test), "--curves", str(tmp_path / "both.png")])
    assert f"curves: {tmp_path / 'both.png'}" in capsys.readouterr().out
    (test / "config.yaml").write_text("ckpt_path: elsewhere/last.ckpt\n")
    with pytest.raises(ConfigError, match=r"is a test run without training curves .*\(the checkpoint it tested"):
        report([str(test), "--curves"])


def test_report_prints_the_gallery_and_keeps_its_output_without_one(world, tmp_path):
    records = records_of(world)
    write_run(tmp_path / "run", [{"id": records[0]["image_id"], "caption": "a dog"}], {"CIDEr": 0.1})
    assert "gallery:" not in render_report(tmp_path / "run")
    (tmp_path / "run" / "gallery.html").write_text("<html></html>")
    assert render_report(tmp_path / "run").endswith(f"\n  gallery: {tmp_path / 'run' / 'gallery.html'}")
    vqa = [{"id": "1", "prompt": "what colour?", "caption": "red", "references": ["red"] * 3}]
    write_run(tmp_path / "vqa", vqa, {"accuracy": 100.0})
    (tmp_path / "vqa" / "gallery.html").write_text("<html></html>")
    assert f"gallery: {tmp_path / 'vqa' / 'gallery.html'}" in render_report(tmp_path / "vqa")


def test_curves_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["report", str(empty), "--curves"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlgen: error: {empty / 'metrics.csv'} does not exist") and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"predictions\.jsonl does not exist"):  # no --curves: as before
        report([str(empty)])
    write_metrics_csv(tmp_path / "fit", {1: 1.0}, {})
    with pytest.raises(ConfigError, match=r"^--curves out\.jpg: the figure is a PNG"):
        report([str(tmp_path / "fit"), "--curves", "out.jpg"])
    with pytest.raises(ConfigError, match=r"give the run directory"):
        report(["--curves", "out.png"])
