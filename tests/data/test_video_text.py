"""Frame sampling, the decord and PyAV readers, and VideoTextDataModule on tiny mp4s written here.

Frame ``i`` of a test video shows a white square in cell ``i % 16`` of a 4 x 4 grid on black, so the brightest cell
of a decoded frame says which frame it is: the tests check *which* frames come back, not only how many.
"""

from __future__ import annotations

import json
import logging
import random
import sys

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from vlgen.data import BadSample, VideoTextDataModule
from vlgen.data.video_io import DecordReader, FrameSampler, PyAVReader, VideoError, make_reader, sample_indices
from vlgen.errors import ConfigError

av = pytest.importorskip("av")
pytest.importorskip("decord")
SIZE = 32
READERS = [DecordReader, PyAVReader]


def write_video(path, num_frames: int, container_format: str | None = None) -> None:
    """``num_frames`` frames of SIZE x SIZE, frame i with a white square in grid cell i % 16."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    cell = SIZE // 4
    with av.open(str(path), mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"crf": "10", "threads": "1"} if codec == "libx264" else {"qscale": "2"}
        out.start_encoding()
        for i in range(num_frames):
            row, col = divmod(i % 16, 4)
            rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
            rgb[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 255
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


def frame_ids(frames) -> list[int]:
    """Which frame (mod 16) each of ``frames`` is: ``[T, H, W, 3]`` uint8 or ``[T, 3, H, W]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(frames)).float()
    gray = x.mean(-1) if x.shape[-1] == 3 else x.mean(1)  # [T, H, W]
    cells = gray.reshape(len(gray), 4, SIZE // 4, 4, SIZE // 4).mean((2, 4))  # [T, 4, 4]
    return cells.flatten(1).argmax(1).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A root with good, short, empty, corrupt and container-without-frame-count videos."""
    root = tmp_path_factory.mktemp("vids")
    (root / "videos").mkdir()
    write_video(root / "videos" / "a.mp4", 16)
    write_video(root / "videos" / "b.mp4", 12)
    write_video(root / "videos" / "short.mp4", 1)
    write_video(root / "videos" / "empty.mp4", 0)  # no frame, so no video stream either
    write_video(root / "videos" / "c.mkv", 16, "matroska")  # mkv records no frame count
    (root / "videos" / "corrupt.mp4").write_bytes(random.Random(0).randbytes(3000))
    return root


def make_dm(root, **kw) -> VideoTextDataModule:
    dm = VideoTextDataModule(str(root), **{"batch_size": 4, "num_workers": 0, "image_size": SIZE, **kw})
    dm.set_transforms(T.ToTensor(), T.ToTensor())  # [3, H, W] in [0, 1]: frame_ids can read the pixels
    return dm


def write_json(path, records) -> None:
    path.write_text(json.dumps(records))


@pytest.mark.parametrize(("n", "k"), [(16, 4), (10, 3), (7, 7), (300, 8), (5, 1)])
def test_uniform_takes_the_centre_of_each_segment(n, k):
    got = sample_indices(n, k, "uniform")
    assert got == [int((i + 0.5) * n / k) for i in range(k)]
    assert got == sample_indices(n, k, "uniform", random.Random(1))  # deterministic
    assert all(i * n / k <= f < (i + 1) * n / k for i, f in enumerate(got))


@pytest.mark.parametrize(("n", "k"), [(16, 4), (10, 3), (9, 9)])
def test_random_takes_one_frame_of_each_segment_and_is_reproducible(n, k):
    rng = random.Random(0)
    draws = [sample_indices(n, k, "random", rng) for _ in range(300)]
    for d in draws:
        assert len(d) == k and d == sorted(d)
        assert all(i * n // k <= f < (i + 1) * n // k for i, f in enumerate(d))
    if n > k:
        assert len({tuple(d) for d in draws}) > 1
        assert {d[0] for d in draws} == set(range(n // k))  # every frame of the first segment can come up
    again = random.Random(0)
    assert draws == [sample_indices(n, k, "random", again) for _ in range(300)]


@pytest.mark.parametrize(("n", "k"), [(16, 4), (15, 5), (9, 3), (300, 8)])
def test_headtail_draws_half_of_the_frames_from_each_half(n, k):
    rng = random.Random(0)
    draws = [sample_indices(n, k, "headtail", rng) for _ in range(200)]
    half = n // 2
    for d in draws:
        head, tail = d[: k // 2], d[k // 2 :]
        assert len(d) == k and d == sorted(d) and len(set(d)) == k
        assert all(0 <= f < half for f in head) and all(half <= f < n for f in tail)
    assert len({tuple(d) for d in draws}) > 10
    again = random.Random(0)
    assert draws == [sample_indices(n, k, "headtail", again) for _ in range(200)]


def test_few_frames_repeat_and_the_sampler_refuses_short_or_empty_videos():
    for mode in ("uniform", "random", "headtail"):
        got = sample_indices(3, 8, mode, random.Random(0))
        assert len(got) == 8 and got == sorted(got) and set(got) <= {0, 1, 2}
    assert sample_indices(2, 4, "uniform") == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        sample_indices(0, 4, "uniform")
    with pytest.raises(VideoError, match="no decodable frames"):
        FrameSampler(4, "uniform")(0)
    with pytest.raises(VideoError, match="too short: 3 frames, fewer than min_frames=4"):
        FrameSampler(4, "uniform")(3)
    assert FrameSampler(4, "uniform", min_frames=2)(3) == [0, 1, 1, 2]


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
def test_readers_return_exactly_the_wanted_frames(videos, reader):
    counts = []
    for name in ("a.mp4", "c.mkv"):
        frames = reader().read(videos / "videos" / name, lambda n: counts.append(n) or [0, 3, 3, 9, 15])
        assert frames.shape == (5, SIZE, SIZE, 3) and frames.dtype == np.uint8
        assert frame_ids(frames) == [0, 3, 3, 9, 15]
    assert counts == [16, 16]  # the mkv's count comes from its packets (PyAV) or its index (decord)
    with pytest.raises(VideoError, match="cannot decode"):
        reader().read(videos / "videos" / "corrupt.mp4", lambda n: [0])
    with pytest.raises(FileNotFoundError):
        reader().read(videos / "videos" / "gone.mp4", lambda n: [0])


def test_the_two_readers_agree(videos):
    pick = lambda n: sample_indices(n, 6, "uniform")  # noqa: E731
    a = DecordReader().read(videos / "videos" / "b.mp4", pick).astype(int)
    b = PyAVReader().read(videos / "videos" / "b.mp4", pick).astype(int)
    assert frame_ids(a) == frame_ids(b) == [1, 3, 5, 7, 9, 11]
    assert np.abs(a - b).mean() < 2.0  # same decoder output, perhaps another YUV -> RGB rounding


def test_a_missing_library_or_an_unknown_backend_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^data\.backend: 'opencv' is not one of decord, pyav$"):
        make_reader("opencv")
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    with pytest.raises(ConfigError, match=r"^the decord video backend needs .*pip install 'vlgen\[video\]'$"):
        VideoTextDataModule(".", backend="decord")


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_train_pairs_eval_groups_and_the_frames_they_carry(videos, backend):
    write_json(
        videos / "pairs.json",
        [
            {"video": "videos/a.mp4", "caption": ["one", "two"], "video_id": "a"},
            {"video": "videos/b.mp4", "caption": "x"},
        ],
    )
    write_json(
        videos / "groups.json",
        [
            {"video": "videos/a.mp4", "caption": "first", "video_id": "a"},
            {"video": "videos/b.mp4", "caption": ["second", "third"], "video_id": "b"},
            {"video": "videos/a.mp4", "caption": ["fourth"], "video_id": "a"},
        ],
    )
    dm = make_dm(videos, train_file="pairs.json", val_file="groups.json", test_file=None, backend=backend)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 2
    train = next(iter(dm.train_dataloader()))
    assert train["pixels"].shape == (3, 4, 3, SIZE, SIZE) and train["num_skipped"] == 0
    assert sorted(zip(train["ids"], train["captions"])) == [("a", "one"), ("a", "two"), ("videos/b.mp4", "x")]
    assert train["references"] == [[c] for c in train["captions"]]
    for clip, vid in zip(train["pixels"], train["ids"]):  # headtail: 2 frames from each half
        ids, n = frame_ids(clip), 16 if vid == "a" else 12
        assert ids == sorted(ids) and all(i < n // 2 for i in ids[:2]) and all(i >= n // 2 for i in ids[2:])
    val = next(iter(dm.val_dataloader()))
    assert val["ids"] == ["a", "b"] and val["captions"] == ["first", "second"]
    assert val["references"] == [["first", "fourth"], ["second", "third"]]
    assert [frame_ids(clip) for clip in val["pixels"]] == [[2, 6, 10, 14], [1, 4, 7, 10]]  # segment centres
    assert dm.summary().endswith(
        f"train 3, val 2 samples; 0 bad records skipped; 4 frames (headtail / uniform sampling, {backend})"
    )


@pytest.fixture
def messy(tmp_path, videos):
    """Annotations with one good video, each kind of bad video and one bad JSONL line."""
    (tmp_path / "videos").symlink_to(videos / "videos")
    names = ["a.mp4", "corrupt.mp4", "short.mp4", "empty.mp4", "gone.mp4"]
    lines = [json.dumps({"video": f"videos/{n}", "caption": f"clip {n}", "video_id": n}) for n in names]
    (tmp_path / "train.jsonl").write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    return tmp_path


def test_bad_videos_and_records_are_skipped_counted_and_logged_once(messy, caplog):
    dm = make_dm(messy, train_file="train.jsonl", val_file=None, test_file=None)
    dm.setup("fit")
    assert dm.bad_records_per_file == {str(messy / "train.jsonl"): 1}
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader()) + list(dm.train_dataloader())  # two epochs
    assert sum(b["num_skipped"] for b in batches) == 2 * 4
    assert [i for b in batches for i in b["ids"]] == ["a.mp4", "a.mp4"]
    reasons = {"corrupt.mp4": "cannot decode", "short.mp4": "too short: 1 frames", "empty.mp4": "video stream"}
    for name, why in {**reasons, "gone.mp4": "no such file"}.items():
        said = [m for m in caplog.messages if name in m]
        assert len(said) == 1 and str(messy / "videos" / name) in said[0] and why in said[0], (name, said)
    lenient = make_dm(messy, train_file="train.jsonl", val_file=None, test_file=None, min_frames=1, batch_size=8)
    batch = next(iter(lenient.train_dataloader()))
    assert sorted(batch["ids"]) == ["a.mp4", "short.mp4"] and batch["num_skipped"] == 3
    assert frame_ids(batch["pixels"][batch["ids"].index("short.mp4")]) == [0, 0, 0, 0]  # the one frame, repeated


def test_strict_mode_raises_and_an_all_bad_batch_is_empty(messy):
    write_json(messy / "bad.json", [{"video": "videos/corrupt.mp4", "caption": "x"}])
    strict = make_dm(messy, train_file="bad.json", val_file=None, test_file=None, skip_bad_samples=False)
    with pytest.raises(BadSample, match=r"corrupt\.mp4: VideoError: cannot decode"):
        next(iter(strict.train_dataloader()))
    with pytest.raises(BadSample, match=r"train\.jsonl:line 3: bad JSON"):
        make_dm(messy, train_file="train.jsonl", skip_bad_samples=False).setup("fit")
    batch = next(iter(make_dm(messy, train_file="bad.json", val_file=None, test_file=None).train_dataloader()))
    assert batch["num_skipped"] == 1 and batch["pixels"].shape == (0, 4, 3, SIZE, SIZE)


def test_missing_paths_are_named_in_one_line(videos, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data\.root: .*nowhere does not exist$"):
        make_dm(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^data\.video_root: .*nowhere does not exist$"):
        make_dm(videos, video_root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"^data\.train_file: .*nope\.json does not exist$"):
        make_dm(videos, train_file="nope.json").setup("fit")
    with pytest.raises(ConfigError, match=r"^data\.train_sampling: 'middle' is not one of"):
        make_dm(videos, train_sampling="middle")


def test_predict_on_a_folder_of_videos(videos, tmp_path):
    for name, src in (("z.mp4", "a.mp4"), ("sub/b.MKV", "c.mkv"), ("sub/x.webm", "corrupt.mp4")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((videos / "videos" / src).read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    dm = make_dm(videos, predict_dir=str(tmp_path))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["ids"] == ["sub/b.MKV", "z.mp4"] and batch["num_skipped"] == 1
    assert batch["captions"] == ["", ""] and batch["references"] == [[], []]
    assert [frame_ids(clip) for clip in batch["pixels"]] == [[2, 6, 10, 14]] * 2


def test_one_augmentation_per_clip_and_reproducible_draws(videos):
    write_json(videos / "many.json", [{"video": "videos/a.mp4", "caption": f"c{i}"} for i in range(8)])

    def probe(img) -> torch.Tensor:  # [2, 1, 1]: which frame this is, and a random draw standing for a random crop
        drawn = torch.rand(()).item() + random.random()
        return torch.tensor([frame_ids(T.functional.pil_to_tensor(img)[None].float())[0], drawn]).view(2, 1, 1)

    def epochs() -> list[list[tuple[list[int], set[float]]]]:  # per epoch, per clip: (frames, draws of its frames)
        dm = make_dm(videos, train_file="many.json", val_file=None, test_file=None, train_sampling="random")
        dm.set_transforms(probe, probe)
        dm.setup("fit")
        torch.manual_seed(0)
        clips = [[dm.datasets["train"][i]["pixels"][:, :, 0, 0] for i in range(8)] for _ in range(2)]  # [T, 2] each
        return [[(c[:, 0].int().tolist(), set(c[:, 1].tolist())) for c in epoch] for epoch in clips]

    first = epochs()
    for frames, draws in first[0] + first[1]:
        assert len(draws) == 1  # every frame of a clip drew the same
        assert all(4 * i <= f < 4 * (i + 1) for i, f in enumerate(frames))  # one frame from each quarter
    assert len({d for _, (d,) in first[0]}) == 8  # each clip drew anew
    assert [f for f, _ in first[0]] != [f for f, _ in first[1]]  # the next epoch draws other frames
    assert epochs() == first  # the same seeds draw the same


def test_workers_draw_their_own_frames_and_evaluate_alike(videos):
    write_json(videos / "same.json", [{"video": "videos/a.mp4", "caption": "c", "video_id": str(i)} for i in range(8)])
    clips = {}
    for workers in (0, 2):
        files = {"train_file": "same.json", "val_file": "same.json", "test_file": None}
        dm = make_dm(videos, **files, num_workers=workers, batch_size=1, train_sampling="random")
        torch.manual_seed(0)
        train = [frame_ids(b["pixels"][0]) for b in dm.train_dataloader()]
        val = torch.cat([b["pixels"] for b in dm.val_dataloader()])
        clips[workers] = (train, val)
    train, val = clips[2]
    assert torch.equal(val, clips[0][1])  # uniform sampling: the same frames whoever decodes them
    assert train[0::2] != train[1::2]  # the two workers (alternate batches) do not repeat each other's draws
