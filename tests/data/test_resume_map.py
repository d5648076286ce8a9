"""Exact resume of the map-style data modules and the text stream (vlgen.data.resume): the epoch's order is fixed by
seed and epoch, a fresh module given a mid-epoch state_dict yields exactly the remaining batches, ranks share an epoch
without overlap, and augmentations (image transforms, video frame choices) depend on the sample's position only."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from vlgen.data import ImageTextDataModule, ShapesWorld, TextCorpusDataModule, VideoTextDataModule
from vlgen.data.resume import EpochBatches, epoch_permutation, run_seed
from vlgen.data.text import TextStream

SMALL = {"num_train": 20, "num_val": 5, "num_test": 5, "num_text": 60}  # 100 training pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return ShapesWorld(seed=0, image_size=32, **SMALL).write(tmp_path_factory.mktemp("w") / "shapes")


def augmenting() -> T.Compose:
    """A random crop and flip (torch's and Python's global generators), so draws show in the pixels."""
    return T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def image_dm(root: Path, **kw) -> ImageTextDataModule:
    dm = ImageTextDataModule(str(root), **{"batch_size": 8, "num_workers": 0, "image_size": 16, **kw})
    dm.set_transforms(augmenting(), T.Compose([T.Resize(16), T.ToTensor()]))
    return dm


def keys(batches: list[dict]) -> list[tuple[list[str], list[str]]]:
    return [(b["ids"], b["captions"]) for b in batches]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return keys(a) == keys(b) and all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b))


def rank_indices(order: EpochBatches) -> list[int]:
    return [index for batch in order for index, _ in batch]


# --- the order --------------------------------------------------------------------------------------------------------
def test_the_order_is_fixed_by_seed_and_epoch_and_is_distributed_samplers():
    def indices(seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        order = EpochBatches(23, 4, seed, rank, world)
        order.set_pass(epoch)
        return rank_indices(order)

    first = indices(3, 0)
    assert first == indices(3, 0) and sorted(first) == list(range(23))
    assert first != indices(4, 0) and first != indices(3, 1) and sorted(indices(3, 1)) == list(range(23))
    for world in (1, 2, 3):
        for rank in range(world):
            ref = DistributedSampler(range(23), num_replicas=world, rank=rank, shuffle=True, seed=3)
            ref.set_epoch(1)
            assert indices(3, 1, rank, world) == list(ref)  # DistributedSampler's order and padding
    assert EpochBatches(23, 4, 3).epoch_length() == 6 and len(EpochBatches(23, 4, 3, 1, 2)) == 3


def test_ranks_share_every_epoch_once_and_a_resume_on_other_ranks_covers_the_rest():
    n, batch = 23, 3
    for world in (2, 3):
        ranks = [EpochBatches(n, batch, 0, r, world) for r in range(world)]
        got = [rank_indices(o) for o in ranks]
        assert len({len(list(o)) for o in ranks}) == 1  # the same number of steps on every rank: no DDP hang
        counts = Counter(i for g in got for i in g)
        assert set(counts) == set(range(n)) and sum(counts.values()) == -(-n // world) * world
        padded = [i for i, c in counts.items() if c > 1]
        order = epoch_permutation(n, 0, 0)
    assert padded == order[: len(padded)]  # padding repeats the epoch's first samples
    # 2 ranks trained 2 batches each (12 samples); 3 ranks take the rest of the epoch: 11 samples and 1 of padding
    two = [EpochBatches(n, batch, 0, r, 2) for r in range(2)]
    done = [i for o in two for b in islice(iter(o), 2) for i, _ in b]
    assert sorted(done) == sorted(order[:12]) and two[0].consumed_after(2) == 12
    rest = []
    for r in range(3):
        three = EpochBatches(n, batch, 0, r, 3)
        three.set_pass(0, start=12)
        rest += rank_indices(three)
        assert len(three) == 2
    assert Counter(rest) == Counter(order[12:] + order[:1])


# --- resume through state_dict ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_a_fresh_module_given_a_mid_epoch_state_continues_with_the_remaining_batches(world, workers):
    straight_dm = image_dm(world, num_workers=workers)
    straight_dm.setup("fit")
    straight = straight_dm.train_dataloader()
    epoch0, epoch1 = list(straight), list(straight)
    assert len(straight) == len(epoch0) == 13 and not same_batches(epoch0, epoch1)
    assert sorted(i for b in epoch0 for i in b["captions"]) == sorted(i for b in epoch1 for i in b["captions"])

    dm = image_dm(world, num_workers=workers)
    dm.setup("fit")
    first = list(islice(iter(dm.train_dataloader()), 5))
    state = dm.state_dict()
    assert state == {"train_position": {"epoch": 0, "consumed": 40, "batches": 5, "seed": run_seed()}}
    assert same_batches(first, epoch0[:5])

    fresh = image_dm(world, num_workers=workers)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint carries it
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    assert len(loader) == 13  # Lightning counts the epoch's batches, the resumed ones included
    rest = list(loader)
    assert same_batches(rest, epoch0[5:])  # exactly the remaining batches, with the same augmentations
    assert fresh.state_dict()["train_position"] == {"epoch": 0, "consumed": 100, "batches": 13, "seed": run_seed()}
    assert same_batches(list(loader), epoch1)  # and the next epoch as an uninterrupted run has it


def test_augmentation_and_samples_do_not_depend_on_workers(world):
    runs = []
    for workers in (0, 2):
        dm = image_dm(world, num_workers=workers, batch_size=16)
        dm.setup("fit")
        runs.append(list(dm.train_dataloader()))
    assert same_batches(runs[0], runs[1])
    crops = torch.cat([b["pixels"] for b in runs[0]])  # [100, 3, 16, 16]
    assert len({x.numpy().tobytes() for x in crops}) > 50  # the 5 pairs of an image drew different crops


def write_video(path: Path, num_frames: int = 16, size: int = 32) -> None:
    """Frame ``i`` is all grey level ``8 * i``: a decoded frame's mean says which frame it is."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(num_frames):
            rgb = np.full((size, size, 3), 8 * i + 4, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


def test_video_frames_and_augmentation_do_not_depend_on_workers_or_the_resume(tmp_path):
    pytest.importorskip("decord")
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4")
    records = [{"video": "videos/a.mp4", "caption": f"clip {i}", "video_id": str(i)} for i in range(12)]
    (tmp_path / "train.json").write_text(json.dumps(records))

    def dm(workers: int) -> VideoTextDataModule:
        m = VideoTextDataModule(str(tmp_path), val_file=None, test_file=None, batch_size=3, num_workers=workers,
                                image_size=16, train_sampling="random", seed=5)  # fmt: skip
        m.set_transforms(augmenting(), T.ToTensor())
        return m

    runs = {}
    for workers in (0, 2):
        m = dm(workers)
        m.setup("fit")
        runs[workers] = list(m.train_dataloader())
    assert same_batches(runs[0], runs[2])
    frames = [tuple(((c.mean((1, 2, 3)) * 255 - 4) / 8).round().int().tolist()) for b in runs[0] for c in b["pixels"]]
    assert len(set(frames)) > 6  # random frames: clips draw their own
    m = dm(2)
    m.setup("fit")
    list(islice(iter(m.train_dataloader()), 1))
    resumed = dm(2)
    resumed.load_state_dict(m.state_dict())
    resumed.setup("fit")
    assert same_batches(list(resumed.train_dataloader()), runs[0][1:])


# --- the text stream --------------------------------------------------------------------------------------------------
def test_the_text_stream_resumes_at_a_batch_and_ignores_the_number_of_workers(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(37)) + "\n\n")  # 2 bad (empty) lines per pass

    def stream(workers: int, take: int, start: int = 0) -> list[dict]:
        s = TextStream([path], batch_size=5, shuffle_buffer=8, seed=1, cycle=True, start_batch=start)
        loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=workers)
        return list(islice(loader, take))

    straight = stream(0, 20)  # 100 sentences: almost three passes
    assert [b["text"] for b in stream(2, 20)] == [b["text"] for b in straight]
    assert sum(b["num_skipped"] for b in straight) == 4  # the bad lines of two whole passes, each counted once
    for start in (3, 8, 15):  # inside the first pass, inside the second, past two passes (jumped)
        assert [b["text"] for b in stream(2, 20 - start, start)] == [b["text"] for b in straight[start:]]


def test_the_text_module_state_continues_the_stream(world):
    def text_dm() -> TextCorpusDataModule:
        return TextCorpusDataModule(train_files=[str(world / "corpus.txt")], batch_size=4, num_workers=1,
                                    shuffle_buffer=16)  # fmt: skip

    dm = text_dm()
    straight = [b["text"] for b in islice(iter(dm.train_dataloader()), 12)]
    dm = text_dm()
    list(islice(iter(dm.train_dataloader()), 7))
    fresh = text_dm()
    fresh.load_state_dict(dm.state_dict())
    assert dm.state_dict() == {"train_position": {"batches": 7}}
    assert [b["text"] for b in islice(iter(fresh.train_dataloader()), 5)] == straight[7:]


# --- under Lightning --------------------------------------------------------------------------------------------------
class Recorder(pl.LightningModule):
    """Records what each rank trains on, per epoch, in ``out/rank<r>.jsonl``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = out

    def training_step(self, batch, batch_idx):
        with open(f"{self.out}/rank{self.global_rank}.jsonl", "a") as f:
            pairs = [f"{i}|{c}" for i, c in zip(batch["ids"], batch["captions"])]
            row = {"epoch": self.current_epoch, "step": self.global_step, "pairs": pairs,
                   "pixels": float(batch["pixels"].double().sum())}  # fmt: skip
            f.write(json.dumps(row) + "\n")
        return (self.weight * batch["pixels"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: Path, out: Path, ckpt_path: str | None = None, **trainer_kw) -> dict[int, list[dict]]:
    out.mkdir(exist_ok=True)
    kw = {"max_epochs": 2, "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
          "enable_model_summary": False, "accelerator": "cpu", "limit_val_batches": 0, "enable_checkpointing": False,
          "default_root_dir": str(out), **trainer_kw}  # fmt: skip
    pl.Trainer(**kw).fit(Recorder(str(out)), datamodule=image_dm(root, batch_size=6), ckpt_path=ckpt_path)
    return {int(p.stem[4:]): [json.loads(x) for x in p.read_text().splitlines()] for p in sorted(out.glob("rank*"))}


def test_a_lightning_resume_from_a_mid_epoch_checkpoint_trains_on_what_an_uninterrupted_run_does(world, tmp_path):
    straight = fit(world, tmp_path / "straight")[0]  # 17 steps per epoch
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    fit(world, tmp_path / "first", max_steps=7, callbacks=[saver], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = fit(world, tmp_path / "rest", ckpt_path=str(tmp_path / "ckpt" / "step=5.ckpt"))[0]
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert [r["step"] for r in rest] == list(range(5, 34))
    assert rest == straight[5:]  # the rest of epoch 0, then epoch 1, the same batches and augmentations


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_under_lightnings_defaults_share_each_epoch_and_resume_on_one_rank(world, tmp_path):
    """Lightning's ``use_distributed_sampler`` (on by default) leaves the loader alone: it deals ranks itself."""
    single = fit(world, tmp_path / "single", max_epochs=1)[0]
    every = Counter(x for r in single for x in r["pairs"])
    assert sum(every.values()) == 100
    pair = fit(world, tmp_path / "pair", devices=2, strategy="ddp_spawn")
    for epoch in (0, 1):
        r0, r1 = ([r["pairs"] for r in pair[k] if r["epoch"] == epoch] for k in (0, 1))
        assert len(r0) == len(r1) == 9  # 100 samples, 2 ranks x 6 a step: 9 steps on each rank (8 full, 1 of 2)
        assert Counter(x for b in r0 + r1 for x in b) == every  # every sample once
        interleaved = [x for b0, b1 in zip(r0, r1) for pair_ in zip(b0, b1) for x in pair_]
        assert (interleaved == [x for r in single for x in r["pairs"]]) == (epoch == 0)  # by position: 1 rank's order
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4, save_top_k=-1)
    first = fit(world, tmp_path / "first", devices=2, strategy="ddp_spawn", max_steps=4, callbacks=[saver],
                enable_checkpointing=True)  # fmt: skip
    rest = fit(world, tmp_path / "rest", ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"), max_epochs=1)[0]
    before = [x for k in (0, 1) for r in first[k] for x in r["pairs"]]
    after = [x for r in rest for x in r["pairs"]]
    assert len(before) == 48 and len(after) == 52 and Counter(before + after) == every  # the remaining ones, once
