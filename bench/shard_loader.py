"""Image shards vs JSON + folder: loader throughput, index build time and size, time to first batch on resume.

    python bench/shard_loader.py [--images 2000] [--image-size 64 224] [--workers 1 2] [--batch 32] [--repeats 3]

Writes a shapes world (``--images`` pictures x 5 captions, PNG) into a temporary folder and converts its training
split to shards of 1000 samples with ``vlgen make-shards`` code, so both modules read the same images and yield the
same (image, caption) samples. Prints, per image size and worker count, samples/s over one epoch for
:class:`~vlgen.data.ImageTextDataModule` and :class:`~vlgen.data.ImageShardDataModule` (mean and range over
``--repeats``; first batch included, workers started per epoch as each module does), the index build time and size
per 10k samples, and the time to the first batch of an epoch started at position 0, at the middle and near the end
(a resumed epoch seeks to its position: it must not grow with the position).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from torchvision import transforms

from vlgen.data import ImageShardDataModule, ImageTextDataModule
from vlgen.data.shards.index import IndexCache
from vlgen.data.shards.write import captions_to_shards
from vlgen.data.synthetic import ShapesWorld


def transform(size: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize([0.5] * 3, [0.5] * 3)])  # fmt: skip


def epoch_rate(loader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["ids"])
    return count / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):8.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.image_size:
            root, shards, index = Path(tmp) / f"world{size}", Path(tmp) / f"shards{size}", Path(tmp) / f"idx{size}"
            ShapesWorld(seed=0, num_train=args.images, num_val=8, num_test=8, image_size=size, num_text=10).write(root)
            captions_to_shards(root / "train.json", root, shards, "image", True, samples_per_shard=1000)
            urls = sorted(str(p) for p in shards.glob("*.tar"))
            samples = args.images * 5
            tf = transform(min(size, 224))
            print(f"\n{size} px PNG, {args.images} images x 5 captions = {samples} samples, batch {args.batch}")
            print(f"{'workers':>7s} {'JSON+folder samples/s':>24s} {'shards samples/s':>24s}")
            for workers in args.workers:
                rates: dict[str, list[float]] = {"json": [], "shards": []}
                for _ in range(args.repeats):
                    js = ImageTextDataModule(str(root), val_file=None, test_file=None, batch_size=args.batch,
                                             num_workers=workers)  # fmt: skip
                    sh = ImageShardDataModule(train_shards=urls, batch_size=args.batch, num_workers=workers,
                                              index_dir=str(index))  # fmt: skip
                    for name, dm in (("json", js), ("shards", sh)):
                        dm.set_transforms(tf, tf)
                        dm.setup("fit")
                        rates[name].append(epoch_rate(dm.train_dataloader()))
                print(f"{workers:7d} {spread(rates['json']):>24s} {spread(rates['shards']):>24s}", flush=True)

            cache = IndexCache(str(Path(tmp) / f"cold{size}"))
            builds = []
            for _ in range(args.repeats):
                for path in cache.root.glob("*.idx"):
                    path.unlink()
                start = time.perf_counter()
                for url in urls:
                    cache.header(url, "image")
                builds.append((time.perf_counter() - start) * 10000 / samples)
            index_bytes = sum(cache.path(u, "image").stat().st_size for u in urls) * 10000 / samples
            shard_mb = sum(Path(u).stat().st_size for u in urls) / 2**20
            print(
                f"index: build {statistics.mean(builds):.3f} s per 10k samples (range {min(builds):.3f}-"
                f"{max(builds):.3f}), {index_bytes / 1024:.0f} KiB per 10k samples (shards: {shard_mb:.1f} MiB)"
            )

            firsts = []
            for position in (0, samples // 2, samples - 2 * args.batch):
                times = []
                for _ in range(args.repeats):
                    fresh = ImageShardDataModule(train_shards=urls, batch_size=args.batch, num_workers=0,
                                                 index_dir=str(index))  # fmt: skip
                    fresh.set_transforms(tf, tf)
                    fresh.setup("fit")
                    fresh.load_state_dict({"train_position": {"epoch": 0, "position": position, "batches": 0}})
                    start = time.perf_counter()
                    next(iter(fresh.train_dataloader()))
                    times.append(1000 * (time.perf_counter() - start))
                mean, low, high = statistics.mean(times), min(times), max(times)
                firsts.append(f"position {position}: {mean:.0f} ms ({low:.0f}-{high:.0f})")
            print("first batch of an epoch started at " + "; ".join(firsts))


if __name__ == "__main__":
    main()
