"""ImageTextDataModule: pairs and grouped references, bad input skipped and counted (or raised), missing files named,
transforms from the model, identical samples with and without workers."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from torchvision import transforms as T

from vlgen.data import BadSample, ImageTextDataModule, ShapesWorld
from vlgen.data.common import BadRecords, read_records
from vlgen.errors import ConfigError

SMALL = {"num_train": 20, "num_val": 5, "num_test": 5, "num_text": 20}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ShapesWorld(seed=0, image_size=32, **SMALL).write(tmp_path_factory.mktemp("w") / "shapes")


def make_dm(root, **kw) -> ImageTextDataModule:
    return ImageTextDataModule(str(root), **{"batch_size": 4, "num_workers": 0, "image_size": 32, **kw})


def all_batches(loader) -> list[dict]:
    return list(loader)


def test_train_pairs_and_eval_references(world):
    dm = make_dm(world)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 20 * 5 and len(dm.datasets["val"]) == 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["num_skipped"] == 0 and batch["references"] == [[c] for c in batch["captions"]]
    train = json.loads((world / "train.json").read_text())
    assert {(r["image_id"], r["caption"]) for r in train} == {
        (i, c) for b in dm.train_dataloader() for i, c in zip(b["ids"], b["captions"])
    }
    refs = {r["image_id"]: r["caption"] for r in json.loads((world / "val.json").read_text())}
    val = [b for b in dm.val_dataloader()]
    assert [i for b in val for i in b["ids"]] == list(refs)  # in file order, not shuffled
    for b in val:
        assert b["references"] == [refs[i] for i in b["ids"]]
        assert b["captions"] == [refs[i][0] for i in b["ids"]]


def test_references_grouped_by_image_id_across_records(tmp_path, world):
    (tmp_path / "img.png").write_bytes((world / "images" / "val_000000.png").read_bytes())
    records = [
        {"image": "img.png", "caption": "first", "image_id": "a"},
        {"image": "img.png", "caption": ["second", "third"], "image_id": "b"},
        {"image": "img.png", "caption": "fourth", "image_id": "a"},
        {"image": "img.png", "caption": "fifth"},  # no image_id: the image path is its id
    ]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = make_dm(tmp_path, train_file=None, val_file="val.jsonl", test_file=None)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["ids"] == ["a", "b", "img.png"]
    assert batch["references"] == [["first", "fourth"], ["second", "third"], ["fifth"]]
    assert batch["captions"] == ["first", "second", "fifth"]


def test_workers_yield_the_same_samples(world):
    runs = []
    for workers in (0, 2):
        dm = make_dm(world, batch_size=3, num_workers=workers)
        dm.setup("fit")
        dm.setup("test")
        torch.manual_seed(0)  # the train sampler's permutation
        train = [i for b in dm.train_dataloader() for i in b["ids"]]
        test = [i for b in dm.test_dataloader() for i in b["ids"]]
        pixels = torch.cat([b["pixels"] for b in dm.test_dataloader()])
        runs.append((train, test, pixels))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 100
    assert runs[0][1] == runs[1][1] == [f"test_{i:06d}" for i in range(5)]
    assert torch.equal(runs[0][2], runs[1][2])


@pytest.fixture
def messy(tmp_path, world):
    """A dataset with one good record and one of each kind of bad record or image."""
    (tmp_path / "images").mkdir()
    good = (world / "images" / "train_000000.png").read_bytes()
    (tmp_path / "images" / "ok.png").write_bytes(good)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png at all")
    (tmp_path / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    lines = [
        json.dumps({"image": "images/ok.png", "caption": "a red circle", "image_id": "1"}),
        "{this is not json",
        json.dumps({"image": "images/ok.png", "caption": "   ", "image_id": "2"}),
        json.dumps({"caption": "no image", "image_id": "3"}),
        json.dumps({"image": "images/missing.png", "caption": "a blue square", "image_id": "4"}),
        json.dumps({"image": "images/corrupt.png", "caption": "a green triangle", "image_id": "5"}),
        json.dumps({"image": "images/truncated.png", "caption": "a green circle", "image_id": "6"}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"image": "images/ok.png", "caption": ["a red circle again", ""], "image_id": "7"}),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_bad_records_and_images_are_skipped_and_counted(messy, caplog):
    dm = make_dm(messy, train_file="train.jsonl", val_file=None, test_file=None)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    # bad JSON (line 2), empty caption (3), no image (4), not an object (8), an empty caption in a list (10)
    assert dm.num_bad_records == 5 and dm.bad_records_per_file == {str(messy / "train.jsonl"): 5}
    for where in ("line 2", "line 3", "line 4", "line 8", "line 10 caption 1"):
        assert sum(f"train.jsonl:{where}:" in m for m in caplog.messages) == 1, where
    assert "5 bad records skipped" in dm.summary()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = all_batches(dm.train_dataloader()) + all_batches(dm.train_dataloader())  # two epochs
    assert sum(b["num_skipped"] for b in batches) == 2 * 3  # missing, corrupt and truncated images
    assert sorted(i for b in batches for i in b["ids"]) == ["1", "1", "7", "7"]
    for name in ("missing.png", "corrupt.png", "truncated.png"):
        assert sum(name in m for m in caplog.messages) == 1, name  # once per file, not once per epoch
    assert all(b["pixels"].shape[1:] == (3, 32, 32) for b in batches)


def test_skip_bad_samples_false_raises_naming_the_place(messy):
    strict = make_dm(messy, train_file="train.jsonl", val_file=None, test_file=None, skip_bad_samples=False)
    with pytest.raises(ValueError, match=r"train\.jsonl:line 2: bad JSON"):
        strict.setup("fit")
    (messy / "clean.json").write_text(json.dumps([{"image": "images/corrupt.png", "caption": "x"}]))
    strict = make_dm(messy, train_file="clean.json", val_file=None, test_file=None, skip_bad_samples=False)
    strict.setup("fit")
    with pytest.raises(BadSample, match=r"corrupt\.png"):
        next(iter(strict.train_dataloader()))


def test_a_batch_of_only_bad_images_is_empty_not_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    records = [{"image": "x.png", "caption": "a red circle"}, {"image": "gone.png", "caption": "a blue square"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    dm = make_dm(tmp_path, train_file="a.json", val_file=None, test_file=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_skipped"] == 2 and batch["ids"] == [] and batch["captions"] == []
    assert batch["pixels"].shape == (0, 3, 32, 32)


def test_missing_paths_are_named_in_one_line(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data\.root: .*nowhere does not exist$"):
        make_dm(tmp_path / "nowhere")
    dm = make_dm(world, train_file="nope.json")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    assert str(info.value) == f"data.train_file: {world / 'nope.json'} does not exist"
    with pytest.raises(FileNotFoundError, match=r"^data\.predict_dir: "):
        make_dm(world, predict_dir=str(tmp_path / "nowhere")).setup("predict")


def test_predict_on_a_folder_or_on_the_test_split(world, tmp_path):
    for name in ("b.png", "sub/a.JPG", "sub/deeper/c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((world / "images" / "test_000000.png").read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    dm = make_dm(world, predict_dir=str(tmp_path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["ids"] == ["b.png", "sub/a.JPG", "sub/deeper/c.webp"]
    assert batch["captions"] == ["", "", ""] and batch["references"] == [[], [], []]
    from_test = make_dm(world)
    from_test.setup("predict")
    batch = next(iter(from_test.predict_dataloader()))
    assert batch["ids"] == [f"test_{i:06d}" for i in range(4)] and all(len(r) == 5 for r in batch["references"])


def test_explicit_transforms(world):
    dm = make_dm(world)
    dm.set_transforms(T.Compose([T.Resize(8), T.ToTensor()]), T.Compose([T.Resize(16), T.ToTensor()]))
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["pixels"].shape == (4, 3, 8, 8)
    assert next(iter(dm.val_dataloader()))["pixels"].shape == (4, 3, 16, 16)


class TinyModel(pl.LightningModule):
    """Asks for 16-px training images and 8-px evaluation images, and checks it gets them."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: dict[str, tuple[int, ...]] = {}

    def image_transform(self, train: bool):
        return T.Compose([T.Resize(16 if train else 8), T.ToTensor()])

    def training_step(self, batch, batch_idx):
        self.seen["train"] = tuple(batch["pixels"].shape[1:])
        return self.layer(batch["pixels"].mean((2, 3))).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["val"] = tuple(batch["pixels"].shape[1:])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_uses_the_model_transforms_and_generates_the_world(tmp_path):
    world = ShapesWorld(seed=1, image_size=32, **SMALL)
    dm = make_dm(tmp_path / "gen", generate=world)
    model = TinyModel()
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, dm)
    assert world.is_written(tmp_path / "gen")
    assert model.seen == {"train": (3, 16, 16), "val": (3, 8, 8)}


def test_official_coco_captions_file(tmp_path):
    coco = {
        "images": [{"id": 9, "file_name": "COCO_9.jpg"}],
        "annotations": [{"image_id": 9, "caption": "a cat"}, {"image_id": 9, "caption": "a cat on a mat"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    bad = BadRecords(tmp_path / "captions.json", strict=False)
    records = [r for _, r in read_records(tmp_path / "captions.json", bad)]
    assert records == [
        {"image": "COCO_9.jpg", "caption": "a cat", "image_id": "9"},
        {"image": "COCO_9.jpg", "caption": "a cat on a mat", "image_id": "9"},
    ]
    assert bad.count == 0


def test_predict_dir_inside_an_installed_package(world, tmp_path, monkeypatch):
    photos = tmp_path / "site" / "photopkg" / "data"
    photos.mkdir(parents=True)
    (photos.parent / "__init__.py").write_text("raise ImportError('a package is found, never imported')\n")
    from PIL import Image

    Image.new("L", (40, 30), 128).save(photos / "grey.png")  # a greyscale photo becomes RGB like any other
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    dm = make_dm(world, predict_dir="pkg:photopkg/data")
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["ids"] == ["grey.png"] and batch["pixels"].shape[1] == 3
    with pytest.raises(ConfigError, match=r"^data\.predict_dir: pkg:photopkg/none: package 'photopkg' has no 'none'"):
        make_dm(world, predict_dir="pkg:photopkg/none")
    with pytest.raises(ConfigError, match=r"^data\.predict_dir: Python package 'nopkg' is not installed"):
        make_dm(world, predict_dir="pkg:nopkg/data")


def test_per_sample_text_travels_in_the_batch(tmp_path, world):
    """With ``prompt_field``, each record's text is the sample's ``prompts`` entry; evaluation keeps one sample per
    (image, text), ids ``ID#k``; a record without the text is skipped and counted."""
    (tmp_path / "img.png").write_bytes((world / "images" / "val_000000.png").read_bytes())
    records = [
        {"image": "img.png", "question": "what colour is the circle", "caption": "red"},
        {"image": "img.png", "question": "what shape is there", "caption": ["a circle", "circle"]},
        {"image": "img.png", "question": "what colour is the circle", "caption": "red circle"},
        {"image": "img.png", "caption": "no question here"},
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = make_dm(tmp_path, train_file="qa.jsonl", val_file="qa.jsonl", test_file=None, prompt_field="question")
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == ["img.png#0", "img.png#1"]
    assert val["prompts"] == ["what colour is the circle", "what shape is there"]
    assert val["references"] == [["red", "red circle"], ["a circle", "circle"]]
    train = dm.datasets["train"]
    assert sorted((train[i]["prompt"], train[i]["caption"]) for i in range(len(train))) == [
        ("what colour is the circle", "red"),
        ("what colour is the circle", "red circle"),
        ("what shape is there", "a circle"),
        ("what shape is there", "circle"),
    ]
    assert dm.bad_records_per_file == {str(tmp_path / "qa.jsonl"): 1}  # the record without a question
    plain = make_dm(tmp_path, train_file=None, val_file="qa.jsonl", test_file=None)
    plain.setup("validate")
    assert "prompts" not in next(iter(plain.val_dataloader()))  # captions only: the key is absent
