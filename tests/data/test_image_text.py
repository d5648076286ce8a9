"""ImageTextDataModule: grouping of references, bad input skipped and counted (or raised), missing files named."""

from __future__ import annotations

import json

import pytest

from vlgen.data import ImageTextDataModule, ShapesWorld
from vlgen.errors import ConfigError

SMALL = {"num_train": 8, "num_val": 3, "num_test": 3, "num_text": 20}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ShapesWorld(seed=0, image_size=32, **SMALL).write(tmp_path_factory.mktemp("w") / "shapes")


def make_dm(root, **kw):
    dm = ImageTextDataModule(str(root), batch_size=4, num_workers=0, image_size=32, **kw)
    return dm


def test_train_pairs_and_eval_references(world):
    dm = make_dm(world)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["num_skipped"] == 0
    assert len(dm.datasets["train"]) == 8 * 5
    val = next(iter(dm.val_dataloader()))
    refs = {r["image_id"]: r["caption"] for r in json.loads((world / "val.json").read_text())}
    assert val["references"] == [refs[i] for i in val["ids"]]
    assert val["captions"] == [refs[i][0] for i in val["ids"]]


def test_workers_yield_the_same_samples(world):
    ids = []
    for workers in (0, 2):
        dm = ImageTextDataModule(str(world), batch_size=2, num_workers=workers, image_size=32)
        dm.setup("test")
        ids.append([i for b in dm.test_dataloader() for i in b["ids"]])
    assert ids[0] == ids[1] and len(ids[0]) == 3


def test_bad_records_and_images_are_skipped_and_counted(world, tmp_path):
    (tmp_path / "images").mkdir()
    good = world / "images" / "train_000000.png"
    (tmp_path / "images" / "ok.png").write_bytes(good.read_bytes())
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png at all")
    lines = [
        json.dumps({"image": "images/ok.png", "caption": "a red circle", "image_id": "1"}),
        "{this is not json",
        json.dumps({"image": "images/ok.png", "caption": "   ", "image_id": "2"}),
        json.dumps({"caption": "no image", "image_id": "3"}),
        json.dumps({"image": "images/missing.png", "caption": "a blue square", "image_id": "4"}),
        json.dumps({"image": "images/corrupt.png", "caption": "a green triangle", "image_id": "5"}),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    dm = make_dm(tmp_path, train_file="train.jsonl", val_file=None, test_file=None)
    dm.setup("fit")
    assert dm.num_bad_records["train"] == 3  # bad JSON, empty caption, no image field
    batches = list(dm.train_dataloader())
    assert sum(b["num_skipped"] for b in batches) == 2  # missing and corrupt image
    assert [i for b in batches for i in b["ids"]] == ["1"]

    strict = make_dm(tmp_path, train_file="train.jsonl", val_file=None, test_file=None, skip_bad_samples=False)
    with pytest.raises(ValueError, match=r"train.jsonl:line 2"):
        strict.setup("fit")


def test_a_batch_of_only_bad_images_is_empty_not_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.png", "caption": "a red circle"}]))
    dm = make_dm(tmp_path, train_file="a.json", val_file=None, test_file=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_skipped"] == 1 and len(batch["ids"]) == 0 and len(batch["pixels"]) == 0


def test_missing_files_are_named(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        make_dm(tmp_path / "nowhere")
    dm = make_dm(world, train_file="nope.json")
    with pytest.raises(ConfigError, match=r"data.train_file: .*nope.json does not exist"):
        dm.setup("fit")


def test_predict_on_a_folder(world, tmp_path):
    for name in ("b.png", "sub/a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((world / "images" / "test_000000.png").read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    dm = make_dm(world, predict_dir=str(tmp_path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["ids"] == ["b.png", "sub/a.png"]
