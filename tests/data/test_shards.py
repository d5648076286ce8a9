"""The shard layer: shard lists, indexes, the seeded order over ranks and workers, mixtures, bad data, resume."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from shard_helpers import png, write_image_shards
from torchvision import transforms

from vlgen.data import ImageShardDataModule, Source, TextShardDataModule
from vlgen.data.common import BadSample
from vlgen.data.shards.index import IndexCache, scan
from vlgen.data.shards.order import Mixture, SourceOrder, dropped_remainder, num_rank_batches, rank_batch
from vlgen.data.shards.urls import expand_braces, expand_shards
from vlgen.data.shards.write import ShardWriter
from vlgen.errors import ConfigError

TF = transforms.Compose([transforms.Resize(8), transforms.ToTensor()])
SIZES = [7, 13, 5, 11, 9]  # uneven shards, 45 samples


def module(tmp_path: Path, train, **kwargs) -> ImageShardDataModule:
    dm = ImageShardDataModule(train_shards=train, index_dir=str(tmp_path / "index"), **kwargs)
    dm.set_transforms(TF, TF)
    dm.setup("fit")
    return dm


def epoch_ids(dm: ImageShardDataModule, world: int = 1, rank: int = 0, epoch: int = 0) -> list[list[str]]:
    dm._world = lambda: (world, rank)  # what a trainer would report
    loader = dm.train_dataloader()
    loader.epoch_fn = lambda: epoch
    return [batch["ids"] for batch in loader]


@pytest.fixture
def shards(tmp_path) -> Path:
    write_image_shards(tmp_path / "shards", SIZES)
    return tmp_path / "shards"


def test_brace_and_glob_expansion(tmp_path):
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    (tmp_path / "x1.tar").write_bytes(b"")
    (tmp_path / "x0.tar").write_bytes(b"")
    assert expand_shards([str(tmp_path / "x*.tar"), str(tmp_path / "x0.tar")], "opt") == [
        str(tmp_path / "x0.tar"),
        str(tmp_path / "x1.tar"),
    ]
    assert expand_shards("s3://bucket/{0..1}.tar", "opt") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    with pytest.raises(FileNotFoundError, match=r"opt: .*nothing-\*\.tar matches no file"):
        expand_shards(str(tmp_path / "nothing-*.tar"), "opt")


def test_index_groups_members_and_names_unusable_samples(tmp_path):
    with ShardWriter(tmp_path, 100) as w:
        w.write("a/000", {"jpg": png(1), "txt": b"one", "json": b"{}"})
        w.write("a/001", {"txt": b"caption without image"})
        w.write("a/002", {"png": png(2)})
    index = scan(str(tmp_path / "00000.tar"), "image")
    assert [key for key, _ in index.samples] == ["a/000"]
    assert set(index.samples[0][1]) == {"jpg", "txt", "json"}
    assert dict(index.bad) == {"a/001": "no image member (has txt)", "a/002": "no caption (.txt or .json) member"}
    assert index.tail_error is None


def test_truncated_tar_keeps_complete_samples(tmp_path):
    write_image_shards(tmp_path, [6])
    path = tmp_path / "00000.tar"
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = [m for m in tar.getmembers()][-2].offset_data + 10  # inside the last sample's members
    path.write_bytes(data[:cut])
    index = scan(str(path), "image")
    assert len(index.samples) == 5
    assert index.tail_error


def test_index_cache_is_reused_and_rebuilt_when_the_shard_changes(tmp_path):
    write_image_shards(tmp_path, [4])
    cache, url = IndexCache(str(tmp_path / "index")), str(tmp_path / "00000.tar")
    assert cache.header(url, "image")["num_samples"] == 4
    built = cache.path(url, "image").stat().st_mtime_ns
    assert cache.header(url, "image")["num_samples"] == 4
    assert cache.path(url, "image").stat().st_mtime_ns == built  # not rebuilt
    write_image_shards(tmp_path, [6])  # same path, new content
    assert cache.header(url, "image")["num_samples"] == 6
    assert [k for k, _ in cache.samples(url, "image")] == [f"{n:06d}" for n in range(6)]


def test_source_order_is_a_permutation_per_epoch():
    order = SourceOrder([7, 13, 5, 11, 9], seed=3, shuffle=True, shuffle_block=10)
    for epoch in (0, 1):
        seen = [order.locate(epoch, i) for i in range(len(order))]
        assert len(set(seen)) == 45 and all(0 <= local < [7, 13, 5, 11, 9][s] for s, local in seen)
    assert [order.locate(0, i) for i in range(45)] != [order.locate(1, i) for i in range(45)]
    plain = SourceOrder([2, 3], seed=3, shuffle=False, shuffle_block=10)
    assert [plain.locate(0, i) for i in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def test_rank_batches_cover_positions_once_and_keep_steps_equal():
    for world, batch, span in [(2, 4, 45), (3, 2, 7), (4, 3, 13), (2, 8, 3)]:
        steps = num_rank_batches(0, span, world, batch, keep_short=False)
        got = [q for r in range(world) for j in range(steps) for q in rank_batch(0, span, world, r, batch, j)]
        dropped = dropped_remainder(0, span, world, batch, keep_short=False)
        assert sorted(got) == list(range(span - dropped)) and dropped < world
        sizes = [len(rank_batch(0, span, world, r, batch, steps - 1)) for r in range(world)] if steps else []
        assert all(s >= 1 for s in sizes) and max(sizes, default=0) - min(sizes, default=0) <= 1


def test_epoch_is_exactly_once_and_independent_of_ranks_and_workers(tmp_path, shards):
    dm = module(tmp_path, str(shards / "{00000..00004}.tar"), batch_size=4, num_workers=0, shuffle_block=8)
    single = [i for b in epoch_ids(dm) for i in b]
    assert sorted(single, key=lambda s: int(s[1:])) == [f"s{n}" for n in range(45)]
    dm2 = module(tmp_path, str(shards / "{00000..00004}.tar"), batch_size=2, num_workers=2, shuffle_block=8)
    ranks = [epoch_ids(dm2, world=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # same number of steps on every rank
    interleaved = [x for b0, b1 in zip(*ranks) for pair in zip(b0, b1) for x in pair]
    interleaved += [x for b0, b1 in zip(*ranks) for x in (b0[len(b1) :] + b1[len(b0) :])]
    dropped = dropped_remainder(0, 45, world=2, batch=2, keep_short=False)
    assert dropped == 1  # 45 = 11 global batches of 4 + 1 sample, fewer than the 2 ranks: left out, counted
    assert interleaved == single[: 45 - dropped]  # 2 ranks x 2 workers interleaved by position == 1 rank x 1 worker
    assert [i for b in epoch_ids(dm, epoch=1) for i in b] != single  # epoch 2 in another order
    assert sorted(i for b in epoch_ids(dm, epoch=1) for i in b) == sorted(single)


def test_resume_on_another_world_size_sees_each_remaining_sample_once(tmp_path, shards):
    spec = str(shards / "*.tar")
    dm = module(tmp_path, spec, batch_size=3, num_workers=2, shuffle_block=8)
    dm._world = lambda: (2, 0)
    loader = dm.train_dataloader()
    loader.epoch_fn = lambda: 0
    seen0 = [b["ids"] for _, b in zip(range(4), loader)]  # rank 0 trains 4 batches; rank 1 the same positions
    state = {"train_position": loader.position_after(4), "source_totals": {}}
    assert state["train_position"] == {"epoch": 0, "position": 24, "batches": 4}
    other = module(tmp_path, spec, batch_size=3, num_workers=2, shuffle_block=8)
    other._world = lambda: (2, 1)
    rank1 = other.train_dataloader()
    rank1.epoch_fn = lambda: 0
    seen1 = [b["ids"] for _, b in zip(range(4), rank1)]
    resumed = module(tmp_path, spec, batch_size=5, num_workers=1, shuffle_block=8)
    resumed.load_state_dict(state)
    rest = [i for b in epoch_ids(resumed, world=1) for i in b]
    done = [i for b in seen0 + seen1 for i in b]
    assert len(done) == 24 and not set(done) & set(rest)
    assert sorted(done + rest, key=lambda s: int(s[1:])) == [f"s{n}" for n in range(45)]


def test_mixture_weights_and_per_source_epochs(tmp_path):
    write_image_shards(tmp_path / "a", [30, 30], prefix="a")
    write_image_shards(tmp_path / "b", [10], prefix="b")
    mix = [Source(str(tmp_path / "a" / "*.tar"), weight=3, name="big"), Source(str(tmp_path / "b" / "*.tar"), 1)]
    dm = module(tmp_path, mix, batch_size=10, num_workers=0, epoch_size=400)
    batches = [b for epoch in range(2) for b in _raw(dm, epoch)]
    names = Counter(i[0] for b in batches for i in b["ids"])
    assert abs(names["a"] / 800 - 0.75) < 0.05  # 3:1 within 5 points
    b_ids = [i for b in batches for i in b["ids"] if i.startswith("b")]
    for k in range(len(b_ids) // 10):  # the small source runs through its own epochs: each 10 draws, all 10 ids
        assert sorted(b_ids[10 * k : 10 * k + 10]) == sorted(f"b{n}" for n in range(10))
    assert set(batches[0]["source_counts"]["names"]) == {"big", "source1"}
    again = module(tmp_path, mix, batch_size=10, num_workers=0, epoch_size=400)
    assert [b["ids"] for b in _raw(again, 0)] == [b["ids"] for b in batches[:40]]  # deterministic by seed
    mixture = Mixture([3, 1], seed=0)
    assert [mixture.at(p) for p in range(5000, 5010)] == [Mixture([3, 1], seed=0).at(p) for p in range(5000, 5010)]


def _raw(dm: ImageShardDataModule, epoch: int) -> list[dict]:
    dm._world = lambda: (1, 0)
    loader = dm.train_dataloader()
    loader.epoch_fn = lambda: epoch
    return list(loader)


def test_bad_data_is_skipped_named_and_counted(tmp_path, caplog):
    write_image_shards(tmp_path, [6, 6])
    with ShardWriter(tmp_path / "bad", 100) as w:
        w.write("x0", {"png": b"not a png", "txt": b"broken image"})
        w.write("x1", {"png": png(1), "txt": b""})  # empty caption
        w.write("x2", {"txt": b"no image"})
    (tmp_path / "bad" / "00000.tar").rename(tmp_path / "00002.tar")
    spec = [str(tmp_path / f"{n:05d}.tar") for n in range(4)]  # 00003.tar does not exist
    with caplog.at_level(logging.WARNING):
        dm = module(tmp_path, spec, batch_size=4, num_workers=0)
        batches = _raw(dm, 0)
    source = dm.plans["train"].sources[0]
    assert source.missing == [spec[3]] and source.num_bad == 1  # x2 has no image: left out of the index
    assert sum(b["num_skipped"] for b in batches) == 2  # x0 (not an image) and x1 (no caption)
    assert sum(len(b["ids"]) for b in batches) == 12
    assert sum(b["source_counts"]["skipped"][0] for b in batches) == 2
    text = caplog.text
    assert "missing shard" in text and "00003.tar" in text and "x2: no image member" in text
    assert "00002.tar:x0" in text and "00002.tar:x1" in text
    with pytest.raises(BadSample, match="missing shard"):
        module(tmp_path, spec, batch_size=4, num_workers=0, skip_bad_samples=False)


def test_no_usable_shard_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train_shards: no usable image sample"):
        module(tmp_path, [str(tmp_path / "missing-0.tar"), str(tmp_path / "missing-1.tar")])
    with pytest.raises(ConfigError, match="weight"):
        ImageShardDataModule(train_shards=[Source("a.tar", weight=0)])


def test_image_batches_keep_the_caption_batch_contract(tmp_path, shards):
    dm = ImageShardDataModule(train_shards=str(shards / "*.tar"), val_shards=str(shards / "00000.tar"),
                              batch_size=4, num_workers=0, index_dir=str(tmp_path / "i"))  # fmt: skip
    dm.set_transforms(TF, TF)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 8, 8) and len(batch["captions"]) == 4
    assert all(r == [c] for r, c in zip(batch["references"], batch["captions"]))
    val = list(dm.val_dataloader())
    assert [i for b in val for i in b["ids"]] == [f"s{n}" for n in range(7)]  # evaluation: shard order
    assert torch.equal(next(iter(dm.train_dataloader()))["pixels"], batch["pixels"])  # seeded, repeatable


def test_text_shards_mix_tars_and_text_files(tmp_path):
    with ShardWriter(tmp_path / "t", 100) as w:
        for n in range(6):
            w.write(f"{n:03d}", {"txt": f"tar sentence {n}".encode()})
    lines = tmp_path / "more.txt"
    lines.write_text("line one\n\nline two\nline three\n")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"caption": "json one"}\n{"other": 1}\n')
    dm = TextShardDataModule(
        train_shards=[str(tmp_path / "t" / "00000.tar"), str(lines), str(jsonl)], batch_size=4, num_workers=0,
        index_dir=str(tmp_path / "i"),
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    text = [t for b in batches for t in b["text"]]
    assert sorted(text) == sorted([f"tar sentence {n}" for n in range(6)] + ["line one", "line two", "line three",
                                                                           "json one"])  # fmt: skip
    assert sum(b["num_skipped"] for b in batches) == 1  # the JSON record without a caption
    assert set(batches[0]) >= {"text", "num_skipped"}


def test_state_dict_round_trip_through_a_checkpoint_dict(tmp_path, shards):
    dm = module(tmp_path, str(shards / "*.tar"), batch_size=4, num_workers=0)
    assert dm.state_dict() == {}  # nothing trained yet
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = dm.state_dict()  # no trainer: what the loader delivered
    assert state["train_position"] == {"epoch": 0, "position": 8, "batches": 2}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state


def test_make_shards_converts_json_and_folder_and_text(tmp_path, capsys):
    from vlgen.cli import main

    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.png").write_bytes(png(n))
    records = [{"image": f"{n}.png", "caption": [f"first {n}", f"second {n}"], "image_id": n} for n in range(4)]
    (tmp_path / "ann.json").write_text(json.dumps(records))  # 3.png does not exist: skipped, counted
    main(["make-shards", "captions", str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "ev"), "--eval"])
    main(["make-shards", "captions", str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "tr"),
          "--samples-per-shard", "4"])  # fmt: skip
    assert "6 samples in 2 shards" in capsys.readouterr().out  # one per (image, caption) pair for training
    assert (tmp_path / "tr" / "00000_stats.json").is_file()
    dm = ImageShardDataModule(train_shards=str(tmp_path / "tr" / "*.tar"), val_shards=str(tmp_path / "ev" / "*.tar"),
                              batch_size=8, num_workers=0, index_dir=str(tmp_path / "i"))  # fmt: skip
    dm.set_transforms(TF, TF)
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == ["0", "1", "2"] and val["references"][1] == ["first 1", "second 1"]
    train = next(iter(dm.train_dataloader()))
    assert sorted(train["captions"]) == sorted(f"{w} {n}" for n in range(3) for w in ("first", "second"))
    (tmp_path / "s.txt").write_text("a b c\n\nd e\n")
    main(["make-shards", "text", str(tmp_path / "s.txt"), str(tmp_path / "txt")])
    assert "2 samples in 1 shards" in capsys.readouterr().out


def test_video_shards_decode_clips_from_memory(tmp_path):
    from vlgen.data import VideoShardDataModule
    from vlgen.data.shards.write import WorldShards
    from vlgen.data.synthetic import MovingShapesWorld

    world = MovingShapesWorld(seed=0, num_train=6, num_val=3, num_test=3, image_size=32, num_frames=8, num_text=10)
    WorldShards(world, str(tmp_path / "w"), str(tmp_path / "s"), samples_per_shard=8).write()
    tar = tmp_path / "s" / "train" / "00000.tar"
    with tarfile.open(tar) as t:
        assert {Path(n).suffix for n in t.getnames()} == {".mp4", ".txt", ".json"}  # video2dataset's layout
    shards = tmp_path / "s"
    for backend in ("decord", "pyav"):
        dm = VideoShardDataModule(
            train_shards=str(shards / "train" / "*.tar"), val_shards=str(shards / "val" / "*.tar"), num_frames=4,
            batch_size=4, num_workers=0, backend=backend, index_dir=str(tmp_path / "i"),
        )  # fmt: skip
        dm.set_transforms(TF, TF)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["pixels"].shape == (4, 4, 3, 8, 8) and batch["num_skipped"] == 0
        val = next(iter(dm.val_dataloader()))
        assert len(val["ids"]) == 3 and all(len(r) == 5 for r in val["references"])
        again = next(iter(dm.train_dataloader()))
        assert torch.equal(batch["pixels"], again["pixels"])  # frames and augmentation seeded per sample


def test_text_module_reads_captions_of_image_shards_without_their_images(tmp_path, shards, monkeypatch):
    dm = TextShardDataModule(train_shards=str(shards / "00000.tar"), batch_size=7, num_workers=0,
                             index_dir=str(tmp_path / "i"))  # fmt: skip
    dm.setup("fit")
    read = []
    source = dm.plans["train"].sources[0]
    original = source._file

    def spy(shard):
        f = original(shard)
        real_read = f.read
        monkeypatch.setattr(f, "read", lambda n: read.append(n) or real_read(n), raising=False)
        return f

    monkeypatch.setattr(source, "_file", spy)
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["text"]) == sorted(f"caption {n}" for n in range(7))
    assert max(read) < 50  # captions and metadata only: no PNG (about 70 bytes each) read


def test_remote_urls_go_through_fsspec(tmp_path):
    """``memory://`` is an fsspec filesystem like ``s3://``: the index is built by streaming, samples read by range."""
    import fsspec

    paths = write_image_shards(tmp_path / "local", [5, 4])
    fs = fsspec.filesystem("memory")
    for n, path in enumerate(paths):
        fs.pipe(f"/bench/{n:05d}.tar", path.read_bytes())
    remote = module(tmp_path, "memory://bench/{00000..00001}.tar", batch_size=3, num_workers=0)
    local = module(tmp_path, [str(p) for p in paths], batch_size=3, num_workers=0)
    assert [b["ids"] for b in _raw(remote, 0)] == [b["ids"] for b in _raw(local, 0)]
    assert torch.equal(_raw(remote, 0)[0]["pixels"], _raw(local, 0)[0]["pixels"])
