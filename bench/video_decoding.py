"""Decoding throughput of the decord and PyAV frame readers on synthetic mp4s.

    python bench/video_decoding.py [--small 200x16x64] [--large 20x300x224] [--gop 30] [--frames 4]

Writes two sets of H.264 videos into a temporary folder with PyAV (count x frames x side; a textured background
scrolling under moving squares, so the encoder produces real inter frames, one keyframe every ``--gop`` frames),
then reads every video with each reader (:mod:`vlgen.data.video_io`, one decoding thread each, as in a dataloader
worker) in two ways: ``uniform-K``, the data module's evaluation path (``K`` segment centres per video), and ``all``,
every frame. Prints videos/s and returned frames/s per case, reader and mode (best of ``--repeat`` passes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from vlgen.data.video_io import READERS, FrameReader, sample_indices


def video_frames(num_frames: int, side: int, seed: int) -> np.ndarray:
    """``[T, side, side, 3]`` uint8: a noise texture scrolling right with two squares moving across it."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    texture = ((texture.astype(np.uint16) + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)) // 3).astype(np.uint8)
    frames = np.empty((num_frames, side, side, 3), np.uint8)
    box = max(side // 6, 2)
    for t in range(num_frames):
        frame = np.roll(texture, t, axis=1)  # [H, W, 3], the background moves one pixel a frame
        for k, colour in enumerate(((255, 40, 40), (40, 40, 255))):
            x = (t * (2 + k) + k * side // 2) % (side - box)
            y = (side // 4 + k * side // 3) % (side - box)
            frame[y : y + box, x : x + box] = colour
        frames[t] = frame
    return frames


def write_videos(folder: Path, count: int, num_frames: int, side: int, gop: int) -> list[Path]:
    """Write ``count`` mp4s (libx264, or mpeg4 without it; yuv420p) and return their paths."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    paths = []
    for i in range(count):
        path = folder / f"v{side}_{num_frames}_{i:04d}.mp4"
        with av.open(str(path), mode="w") as out:
            stream = out.add_stream(codec, rate=30)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                stream.options = {"crf": "23", "preset": "veryfast", "threads": "1"}
            for rgb in video_frames(num_frames, side, seed=i):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            out.mux(stream.encode(None))
        paths.append(path)
    return paths


def timed_pass(reader: FrameReader, paths: list[Path], frames: int | None) -> tuple[float, int]:
    """Seconds to read every video (``frames`` uniform frames, or all with ``None``) and the frames returned."""
    returned = 0
    start = time.perf_counter()
    for path in paths:
        if frames is None:
            out = reader.read(path, lambda n: range(n))
        else:
            out = reader.read(path, lambda n: sample_indices(n, frames, "uniform"))
        returned += len(out)
    return time.perf_counter() - start, returned


def parse_case(text: str) -> tuple[int, int, int]:
    count, frames, side = (int(v) for v in text.lower().split("x"))
    return count, frames, side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=parse_case, default=(200, 16, 64), help="videos x frames x side")
    parser.add_argument("--large", type=parse_case, default=(20, 300, 224), help="videos x frames x side")
    parser.add_argument("--gop", type=int, default=30, help="keyframe interval of the written videos")
    parser.add_argument("--frames", type=int, default=4, help="frames per video in the uniform mode")
    parser.add_argument("--repeat", type=int, default=3, help="passes per measurement; the best is kept")
    parser.add_argument("--backends", nargs="+", default=list(READERS), choices=list(READERS))
    args = parser.parse_args()

    readers = {name: READERS[name]() for name in args.backends}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (count, num_frames, side) in (("small", args.small), ("large", args.large)):
            start = time.perf_counter()
            paths = write_videos(Path(tmp), count, num_frames, side, args.gop)
            print(f"wrote {count} videos of {num_frames} frames at {side}x{side} in {time.perf_counter() - start:.1f}s")
            case = f"{label} {count}x{num_frames}@{side}"
            for name, reader in readers.items():
                reader.read(paths[0], lambda n: [0])  # warm-up: library loading, first open
                for mode, frames in ((f"uniform-{args.frames}", args.frames), ("all", None)):
                    seconds, returned = min(timed_pass(reader, paths, frames) for _ in range(args.repeat))
                    rows.append((case, name, mode, count / seconds, returned / seconds))
    print(f"\n{'case':<20} {'reader':<8} {'mode':<10} {'videos/s':>10} {'frames/s':>10}")
    for case, name, mode, videos_per_s, frames_per_s in rows:
        print(f"{case:<20} {name:<8} {mode:<10} {videos_per_s:>10.1f} {frames_per_s:>10.0f}")


if __name__ == "__main__":
    main()
