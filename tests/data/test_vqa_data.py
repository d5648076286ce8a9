"""VQA splits on the caption data modules: VQAv2 / OK-VQA question + annotation files, GQA, LAVIS JSON; prompts,
references, weighted targets, test-dev without answers, bad records counted, mistakes named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlgen.data import ImageTextDataModule, VQATask, clean_question
from vlgen.data.common import BadRecords
from vlgen.errors import ConfigError

ANSWERS = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]


def _image(path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


@pytest.fixture
def vqav2(tmp_path):
    """A two-question val2014 split and a one-question test-dev split in the official layout, with COCO images."""
    for image_id in (1, 2):
        _image(tmp_path / "images" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    _image(tmp_path / "images" / "test2015" / f"COCO_test2015_{3:012d}.jpg")
    questions = [
        {"image_id": 1, "question": "How many dogs are there?", "question_id": 10},
        {"image_id": 2, "question": "Is it (really) red?", "question_id": 20},
    ]
    (tmp_path / "q_val.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))

    def answers(values):
        return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(values)]

    annotations = [
        {"question_id": 10, "image_id": 1, "answers": answers(ANSWERS), "multiple_choice_answer": "2",
         "answer_type": "number", "question_type": "how many"},
        {"question_id": 20, "image_id": 2, "answers": answers(["yes"] * 10), "multiple_choice_answer": "yes",
         "answer_type": "yes/no", "question_type": "is it"},
    ]  # fmt: skip
    (tmp_path / "a_val.json").write_text(json.dumps({"annotations": annotations}))
    test_q = [{"image_id": 3, "question": "What is this?", "question_id": 30}]
    (tmp_path / "q_testdev.json").write_text(json.dumps({"data_subtype": "test-dev2015", "questions": test_q}))
    return tmp_path


def make_dm(root, task, **kw) -> ImageTextDataModule:
    args = {"batch_size": 4, "num_workers": 0, "image_size": 16, "image_root": str(root / "images"), **kw}
    return ImageTextDataModule(str(root), task=task, **args)


def test_clean_question_as_lavis():
    assert clean_question("What's (this) thing?!  ") == "what's this thing?"
    assert clean_question("a b c", max_words=2) == "a b"


def test_vqav2_files_give_one_sample_per_question(vqav2):
    task = VQATask(val_annotations="a_val.json")
    dm = make_dm(vqav2, task, train_file="q_val.json", val_file="q_val.json", test_file="q_testdev.json")
    task.train_annotations = "a_val.json"
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == ["10", "20"]
    assert val["prompts"] == [
        "Question: how many dogs are there? Short answer:",
        "Question: is it really red? Short answer:",
    ]
    assert val["references"] == [ANSWERS, ["yes"] * 10]  # every annotator's answer, in the file's order
    assert val["answer_types"] == ["number", "yes/no"] and val["question_types"] == ["how many", "is it"]
    assert "targets" not in val
    train = next(iter(dm.train_dataloader()))
    by_id = dict(zip(train["ids"], zip(train["targets"], train["target_weights"], train["captions"], strict=True)))
    targets, weights, caption = by_id["10"]
    assert targets == ["2", "two", "3"] and weights == pytest.approx([0.8, 0.1, 0.1]) and caption == "2"
    assert by_id["20"][:2] == (["yes"], [1.0])


def test_most_common_answer_is_the_single_target(vqav2):
    task = VQATask(answers="most_common", train_annotations="a_val.json")
    dm = make_dm(vqav2, task, train_file="q_val.json", val_file=None, test_file=None)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert "targets" not in train and sorted(train["captions"]) == ["2", "yes"]


def test_test_dev_has_no_answers_and_reads_test2015_images(vqav2):
    dm = make_dm(vqav2, VQATask(), test_file="q_testdev.json", train_file=None, val_file=None)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["ids"] == ["30"] and batch["references"] == [[]] and batch["num_skipped"] == 0


def test_gqa_and_lavis_layouts(tmp_path):
    _image(tmp_path / "images" / "n1.jpg")
    _image(tmp_path / "images" / "train" / "x.jpg")
    types = {"structural": "verify", "semantic": "rel"}
    gqa = {"201": {"imageId": "n1", "question": "Is the cup left?", "answer": "no", "types": types}}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    lavis = [{"question_id": 7, "question": "what is it", "image": "train/x.jpg", "answer": ["cup", "mug"]}]
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    dm = make_dm(tmp_path, VQATask(metric="exact"), train_file=None, val_file="lavis.json", test_file="gqa.json")
    dm.setup("validate")
    dm.setup("test")
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == ["7"] and val["references"] == [["cup", "mug"]] and "answer_types" not in val
    test = next(iter(dm.test_dataloader()))
    assert test["ids"] == ["201"] and test["references"] == [["no"]]
    assert test["answer_types"] == ["verify"] and test["question_types"] == ["rel"]


def test_bad_records_are_counted_and_mistakes_named(tmp_path):
    _image(tmp_path / "a.png")
    lines = [
        json.dumps({"question_id": 1, "question": "q?", "image": "a.png", "answer": ["x"]}),
        "{not json",
        json.dumps({"question_id": 2, "image": "a.png", "answer": ["x"]}),  # no question
        json.dumps({"question_id": 3, "question": "q?", "answer": ["x"]}),  # no image
        json.dumps({"question_id": 4, "question": "q?", "image": "missing.png", "answer": ["x"]}),  # unreadable
    ]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    dm = make_dm(tmp_path, VQATask(), image_root=str(tmp_path), train_file=None, val_file="val.jsonl", test_file=None)
    dm.setup("validate")
    assert dm.num_bad_records == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["ids"] == ["1"] and batch["num_skipped"] == 1
    (tmp_path / "dup.json").write_text(json.dumps([json.loads(lines[0])] * 2))
    dup = make_dm(tmp_path, VQATask(), image_root=str(tmp_path), train_file=None, val_file="dup.json", test_file=None)
    with pytest.raises(ConfigError, match="question ids occur more than once"):
        dup.setup("validate")
    with pytest.raises(ConfigError, match="prompt_field"):
        make_dm(tmp_path, VQATask(), prompt_field="question")
    with pytest.raises(ConfigError, match="exactly one"):
        VQATask(prompt_template="Question: Answer:")


def test_missing_annotation_file_is_named(vqav2):
    task = VQATask(val_annotations="nope.json")
    dm = make_dm(vqav2, task, train_file=None, val_file="q_val.json", test_file=None)
    with pytest.raises(FileNotFoundError, match=r"data\.task\.val_annotations"):
        dm.setup("validate")


def test_questions_without_annotation_are_skipped(vqav2, tmp_path):
    data = json.loads((vqav2 / "a_val.json").read_text())
    (vqav2 / "a_one.json").write_text(json.dumps({"annotations": data["annotations"][:1]}))
    bad = BadRecords(vqav2 / "q_val.json", strict=False)
    found = VQATask(val_annotations="a_one.json").questions(vqav2 / "q_val.json", vqav2, "val", "image", bad)
    assert [q.id for q in found] == ["10"] and bad.count == 1


def test_the_motion_worlds_questions_on_the_video_module(tmp_path):
    from vlgen.data import VideoTextDataModule
    from vlgen.data.synthetic import MovingShapesWorld

    root = MovingShapesWorld(seed=0, num_train=2, num_val=2, num_test=2, num_text=10).write(tmp_path / "motion")
    dm = VideoTextDataModule(
        str(root), train_file="vqa_train.json", val_file=None, test_file="vqa_test.json", num_frames=2,
        batch_size=8, num_workers=0, image_size=16, task=VQATask(),
    )  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    test = next(iter(dm.test_dataloader()))
    records = json.loads((root / "vqa_test.json").read_text())
    assert test["pixels"].shape[:2] == (6, 2) and test["num_skipped"] == 0  # 2 clips x 3 questions, 2 frames each
    assert test["ids"] == [str(r["question_id"]) for r in records]
    assert test["references"] == [r["answer"] for r in records]
    train = next(iter(dm.train_dataloader()))
    assert all(abs(sum(w) - 1.0) < 1e-9 for w in train["target_weights"])
