"""TextCorpusDataModule: every line once over ranks x workers, seeded order per epoch, bad lines counted across
workers (or raised), JSON sources, globs, named missing files, lazy reading, and a Lightning fit."""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from vlgen.data import BadSample, ShapesWorld, TextCorpusDataModule
from vlgen.data.text import TextStream, resolve_files
from vlgen.errors import ConfigError

WORDS = "red green blue circle square triangle left of right above below a the small large".split()


def sentence(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)) + f" {i % 41}"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    lines = [sentence(i) for i in range(103)] + [sentence(5)] * 3  # repeated sentences: a multiset
    lines[10:10] = ["", "   "]
    return write_lines(tmp_path / "corpus.txt", lines)


def good_lines(path: Path) -> Counter:
    return Counter(line.strip() for line in path.read_text().splitlines() if line.strip())


def read(files: list[Path], workers: int = 0, **kw) -> list[dict]:
    """All batches of one pass (or of a cycling stream: pass ``take``), through a real DataLoader."""
    take = kw.pop("take", None)
    stream = TextStream(files, **{"batch_size": 4, **kw})
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(islice(loader, take))


def texts(batches: list[dict]) -> list[str]:
    return [t for b in batches for t in b["text"]]


def test_two_ranks_two_workers_read_every_line_once(corpus):
    per_rank = [texts(read([corpus], workers=2, rank=r, world_size=2, shuffle_buffer=8, seed=3)) for r in (0, 1)]
    assert Counter(per_rank[0] + per_rank[1]) == good_lines(corpus)
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # round robin over lines: balanced ranks


def test_order_is_seeded_and_reshuffled_per_epoch(corpus):
    def order(**kw) -> list[str]:
        return texts(read([corpus], shuffle_buffer=16, **kw))

    first = order(seed=0)
    assert first == order(seed=0) and first != order(seed=1)
    assert Counter(first) == good_lines(corpus)
    next_epoch = order(seed=0, epoch=1)
    assert next_epoch != first and Counter(next_epoch) == good_lines(corpus)
    assert texts(read([corpus], shuffle_buffer=0)) == [s for s in corpus.read_text().splitlines() if s.strip()]


def test_training_stream_cycles_epochs(tmp_path):
    path = write_lines(tmp_path / "c.txt", [sentence(i) for i in range(24)])
    epochs = [texts(read([path], shuffle_buffer=100, epoch=e)) for e in (0, 1)]
    cycled = texts(read([path], shuffle_buffer=100, cycle=True, take=12))  # 48 sentences: two epochs
    assert cycled == epochs[0] + epochs[1]


def test_length_filter(tmp_path):
    path = write_lines(tmp_path / "c.txt", ["one", "one two", "one two three", "a b c d", "a b c d e f"])
    got = read([path], min_words=2, max_words=4)
    assert texts(got) == ["one two", "one two three", "a b c d"]
    assert sum(b["num_skipped"] for b in got) == 0  # filtered is not bad


def test_bad_lines_skipped_and_counted_across_workers(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"red circle\n\n   \n\xff\xfe bad\nblue square\n" + b"green triangle\n" * 5)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        '{"caption": "a small circle"}\n{not json\n[1, 2]\n{"text": "no caption"}\n'
        '{"caption": ["two of", "them", ""]}\n{"caption": ""}\n'
    )
    batches = read([txt, jsonl], workers=2, rank=1, world_size=2) + read([txt, jsonl], workers=2, rank=0, world_size=2)
    assert (
        sum(b["num_skipped"] for b in batches) == 3 + 4
    )  # an empty entry of a usable list is no sentence, not a bad line
    expected = ["red circle", "blue square", *["green triangle"] * 5, "a small circle", "two of", "them"]
    assert Counter(texts(batches)) == Counter(expected)
    with pytest.raises(BadSample, match=r"a\.txt:line 2: empty line"):
        read([txt], strict=True)


def test_jsonl_text_field_and_caption_lists(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"line {i}", "caption": "ignored"}) + "\n" for i in range(5)))
    assert texts(read([jsonl], text_field="text")) == [f"line {i}" for i in range(5)]
    captions = tmp_path / "caps.json"
    captions.write_text(json.dumps([{"caption": ["a b", "c d"]}, "not a record", {"caption": "e f"}] * 3))
    batches = read([captions], workers=2)
    assert Counter(texts(batches)) == Counter(["a b", "c d", "e f"] * 3)
    assert sum(b["num_skipped"] for b in batches) == 3  # counted once, not once per worker


def test_globs_and_missing_files(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text(f"{name}\n" if name.endswith("txt") else '{"caption": "c"}\n')
    assert [p.name for p in resolve_files([str(tmp_path / "*.txt"), str(tmp_path / "*")], "x")] == [
        "a.txt",
        "b.txt",
        "c.jsonl",
    ]
    for missing in ("nope.txt", "*.none"):
        with pytest.raises(FileNotFoundError) as err:
            TextCorpusDataModule(train_files=[str(tmp_path / missing)])
        assert str(err.value).startswith("data.train_files: ") and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"data\.val_files"):
        TextCorpusDataModule(train_files=[str(tmp_path / "a.txt")], val_files=[str(tmp_path / "v.json")])
    with pytest.raises(ConfigError, match=r"data\.max_words"):
        TextCorpusDataModule(train_files=[str(tmp_path / "a.txt")], min_words=3, max_words=2)


def test_large_corpus_is_streamed(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("a red circle left of a blue square\n" * 200_000)
    lines_read = []
    real_open = Path.open

    class Counting:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def __iter__(self):
            for line in self.f:
                lines_read.append(1)
                yield line

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read whole"))
    monkeypatch.setattr(Path, "read_bytes", lambda *a, **k: pytest.fail("read whole"))
    start = time.perf_counter()
    batch = next(iter(TextStream([path], batch_size=8, shuffle_buffer=100)))
    assert len(batch["text"]) == 8 and time.perf_counter() - start < 1.0
    assert len(lines_read) <= 100 + 8 + 1


class CountingModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_sizes: list[int] = []
        self.val_sizes: list[int] = []

    def training_step(self, batch, batch_idx):
        assert isinstance(batch["text"][0], str) and batch["num_skipped"] >= 0
        self.train_sizes.append(len(batch["text"]))
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx) -> None:
        self.val_sizes.append(len(batch["text"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fits_with_max_steps_and_validates(tmp_path):
    world = ShapesWorld(seed=0, num_train=2, num_val=3, num_test=1, image_size=8, num_text=20)
    root = tmp_path / "w"
    dm = TextCorpusDataModule(
        train_files=[str(root / "corpus.txt")], val_files=[str(root / "val.json")], batch_size=8, num_workers=1,
        generate=world,
    )  # fmt: skip
    model = CountingModule()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=7, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.train_sizes == [8] * 7  # 56 sentences from a corpus of 20: the stream cycled
    assert sum(model.val_sizes) == 2 * 3 * 5  # two validations at steps 3 and 6, 3 images x 5 captions each
    assert trainer.global_step == 7
