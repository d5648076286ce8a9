"""Odd but legitimate inputs are read correctly, and unusable ones are refused with a name and a count, never altered
silently: 16-bit, 32-bit, float and transparent images, EXIF orientation, GIFs, annotation files that are not UTF-8
or start with a byte-order mark, dangling symlinks and stray files in a predict folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vlgen.data import BadSample, ImageTextDataModule
from vlgen.data.common import BadRecords, read_records
from vlgen.data.images import to_rgb
from vlgen.errors import ConfigError


def predict_dm(folder: Path, **kw) -> ImageTextDataModule:
    """A module that captions ``folder`` and hands back the exact uint8 pixels of each image."""
    dm = ImageTextDataModule(
        str(folder), train_file=None, val_file=None, test_file=None, predict_dir=str(folder), num_workers=0, **kw
    )
    dm.set_transforms(T.PILToTensor(), T.PILToTensor())
    return dm


def predicted(folder: Path, **kw) -> dict:
    """The one predict batch of ``folder``."""
    dm = predict_dm(folder, **kw)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    return batch


def hwc(pixels: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` uint8 pixels as an ``[H, W, 3]`` array."""
    return pixels.permute(1, 2, 0).numpy()


def test_a_16_bit_png_is_scaled_by_its_range_not_clipped_white(tmp_path):
    levels = np.rint(np.linspace(0, 65535, 64)).astype(np.uint16)
    Image.fromarray(np.tile(levels, (8, 1))).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"  # what PIL makes of a 16-bit greyscale PNG
    pixels = hwc(predicted(tmp_path)["pixels"][0])
    expected = np.rint(levels / 257).astype(np.uint8)
    assert pixels.shape == (8, 64, 3)
    assert all(np.array_equal(pixels[row, :, c], expected) for row in range(8) for c in range(3))
    assert (pixels == 255).mean() < 0.05  # PIL's convert("RGB") alone: 98% white


def test_integer_float_and_transparent_images_follow_the_documented_rules(tmp_path):
    unscaled = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.int32))  # mode I, no declared depth: 16
    assert np.asarray(to_rgb(unscaled))[0, :, 0].tolist() == [0, 1, 128, 255]
    Image.fromarray(np.array([[-5, 0, 2**30, 2**31 - 1]], dtype=np.int32)).save(tmp_path / "i32.tif")
    tiff = Image.open(tmp_path / "i32.tif")
    assert tiff.mode == "I"  # declared: 32-bit signed samples, so the range is [0, 2**31 - 1]
    assert np.asarray(to_rgb(tiff))[0, :, 0].tolist() == [0, 0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255, 0]
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(bytes_range))[0, :, 0].tolist() == [0, 100, 255]
    clear = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    clear.putpixel((1, 0), (0, 0, 255, 255))
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255], [0, 0, 255]]]  # transparent is white, not black
    assert to_rgb(Image.new("L", (3, 2), 7)).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    stored.save(tmp_path / "phone.jpg", exif=exif)
    with Image.open(tmp_path / "phone.jpg") as raw:
        as_stored = np.asarray(raw.convert("RGB"))  # the decoded JPEG, sideways
    pixels = hwc(predicted(tmp_path)["pixels"][0])
    assert pixels.shape == (40, 20, 3)
    assert np.array_equal(pixels, np.rot90(as_stored, k=-1))


def test_a_gif_is_captioned_through_predict_by_its_first_frame(tmp_path):
    first, second = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "still.png")
    batch = predicted(tmp_path)
    assert batch["ids"] == ["anim.gif", "still.png"] and batch["num_skipped"] == 0
    assert np.all(hwc(batch["pixels"][0]) == (255, 0, 0))


def test_a_dangling_symlink_is_named_and_counted_and_stray_files_are_reported(tmp_path, caplog):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    os.symlink(tmp_path / "deleted.png", tmp_path / "link.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO):
        batch = predicted(tmp_path)
    assert batch["ids"] == ["ok.png"] and batch["num_skipped"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 of the media files" in m and "link.png (dangling symlink)" in m for m in warnings), warnings
    assert any("skipping unreadable file" in m and "link.png" in m for m in warnings), warnings
    assert any("ignored 1 files" in m and "notes.txt" in m for m in caplog.messages), caplog.messages
    strict = predict_dm(tmp_path, skip_bad_samples=False)
    strict.setup("predict")
    with pytest.raises(BadSample, match=r"link\.png"):
        list(strict.predict_dataloader())


def latin1_jsonl(root: Path) -> Path:
    """An annotation file with one ASCII record and one written in Latin-1 ("café" as the bytes ``caf\\xe9``)."""
    Image.new("RGB", (8, 8)).save(root / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": c}, ensure_ascii=False) for c in ("a dog", "un café")]
    path = root / "train.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


def test_a_latin_1_annotation_file_skips_and_counts_the_undecodable_records(tmp_path, caplog):
    path = latin1_jsonl(tmp_path)
    dm = ImageTextDataModule(str(tmp_path), train_file="train.jsonl", val_file=None, test_file=None, num_workers=0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.bad_records_per_file == {str(path): 1}
    assert [item.captions for item in dm.datasets["train"].items] == [("a dog",)]  # nothing decoded as "caf\ufffd"
    assert sum("train.jsonl:line 2: not valid UTF-8 (byte 0xe9)" in m for m in caplog.messages) == 1
    strict = ImageTextDataModule(
        str(tmp_path), train_file="train.jsonl", val_file=None, test_file=None, skip_bad_samples=False
    )
    with pytest.raises(BadSample, match=r"train\.jsonl:line 2: not valid UTF-8"):
        strict.setup("fit")


def test_a_latin_1_json_list_skips_the_records_holding_bad_bytes(tmp_path):
    records = [{"image": "a.png", "caption": "a dog"}, {"image": "a.png", "caption": "un café"}]
    path = tmp_path / "list.json"
    path.write_bytes(json.dumps(records, ensure_ascii=False).encode("latin-1"))
    bad = BadRecords(path, strict=False)
    assert [r["caption"] for _, r in read_records(path, bad)] == ["a dog"] and bad.count == 1
    with pytest.raises(BadSample, match=r"list\.json:record 1: not valid UTF-8"):
        list(read_records(path, BadRecords(path, strict=True)))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_byte_order_mark_is_read_not_counted(tmp_path, encoding):
    records = [{"image": "a.png", "caption": "un café"}, {"image": "a.png", "caption": "naïve"}]
    as_list, as_lines = tmp_path / "list.json", tmp_path / "lines.jsonl"
    as_list.write_text(json.dumps(records, ensure_ascii=False), encoding=encoding)
    as_lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding=encoding)
    for path in (as_list, as_lines):
        assert path.read_bytes()[:2] in (b"\xef\xbb", b"\xff\xfe", b"\xfe\xff")  # the mark is there
        bad = BadRecords(path, strict=True)
        assert [r["caption"] for _, r in read_records(path, bad)] == ["un café", "naïve"] and bad.count == 0


def test_a_broken_utf_16_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "half.json"
    path.write_bytes("[]".encode("utf-16") + b"\x00")  # an odd number of bytes
    with pytest.raises(ConfigError, match=r"half\.json: not valid UTF-16 .*re-encode it as UTF-8$"):
        list(read_records(path, BadRecords(path, strict=False)))
