"""Opened image files -> 8-bit RGB as the models expect, the same way wherever vlgen reads an image.

:func:`to_rgb` is the one conversion every image loader uses (the image-caption folders and the WebDataset shards).
``Image.convert("RGB")`` alone gets some files wrong; the rules here:

* **Orientation**: the EXIF orientation tag is applied first (:func:`PIL.ImageOps.exif_transpose`), so a phone photo
  stored sideways comes out upright.
* **16-bit greyscale** (``I;16`` modes, e.g. a 16-bit PNG): values are scaled by their true range,
  ``round(v / 257)``: 0 -> 0, 65535 -> 255. (``convert`` clips at 255, which turns nearly every pixel white.)
* **32-bit integer** (mode ``I``): the range is ``[0, 2**bits - 1]`` with the bit depth the file declares (TIFF
  ``BitsPerSample``; signed TIFF samples ``[0, 2**(bits-1) - 1]``; a PNG's ``I`` is 16-bit). Without a declared
  depth: 16 bits when every value fits, else int32's positive range (31 bits). Values outside the range are clipped
  (negative ones are black).
* **Float** (mode ``F``): intensities in ``[0, 1]`` when the largest finite value is at most 1, else in ``[0, 255]``
  (PIL's convention); clipped to that range, NaN black.
* **Transparency** (``RGBA``, ``LA``, ``PA``, a palette or colour key with a transparent entry): composited on
  **white**, as a page shows it, instead of PIL's dropping of alpha, which shows whatever colour the transparent
  pixels happen to hold (usually black).
* Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...): PIL's own conversion (CMYK without ICC profile).
* **Animated** files (GIF, WebP, APNG): the first frame.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, SIGNED_INT = 258, 339, 2
WHITE = (255, 255, 255, 255)
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (as opened, on its first frame) decoded, turned upright and converted to 8-bit RGB by the rules of
    this module; a new image, independent of the file.

    Raises:
        OSError: the file cannot be decoded (a truncated file fails here, not in the model).
    """
    img.load()
    declared = declared_bits(img)  # read before the transpose, which drops the file's tags
    upright = ImageOps.exif_transpose(img)  # always a new image
    if upright.mode.startswith("I;16"):
        return _grey(upright, 16)
    if upright.mode == "I":
        return _grey(upright, declared)
    if upright.mode == "F":
        return _float_grey(upright)
    if upright.mode in ALPHA_MODES or "transparency" in upright.info:  # Pillow >= 10.1: has_transparency_data
        page = Image.new("RGBA", upright.size, WHITE)
        page.alpha_composite(upright.convert("RGBA"))
        return page.convert("RGB")
    return upright if upright.mode == "RGB" else upright.convert("RGB")


def declared_bits(img: Image.Image) -> int | None:
    """The bit depth of an integer (mode ``I``) image's range as its file declares it, or None when it does not:
    TIFF ``BitsPerSample`` (one less for signed samples), 16 for a PNG."""
    if img.mode != "I":
        return None
    if img.format == "PNG":
        return 16
    tags = getattr(img, "tag_v2", None)
    if tags is None or TIFF_BITS_PER_SAMPLE not in tags:
        return None
    bits, signed = _first(tags[TIFF_BITS_PER_SAMPLE]), _first(tags.get(TIFF_SAMPLE_FORMAT, 1)) == SIGNED_INT
    return bits - 1 if signed else bits


def _first(value: int | tuple[int, ...]) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def _grey(img: Image.Image, bits: int | None) -> Image.Image:
    """An integer greyscale image with values in ``[0, 2**bits - 1]`` as 8-bit RGB, rounded to the nearest level."""
    values = np.asarray(img).astype(np.int64)
    if bits is None:
        bits = 16 if values.size == 0 or values.max() <= 0xFFFF else 31
    top = (1 << bits) - 1
    if top == 255:
        levels = np.clip(values, 0, 255)
    else:
        levels = (np.clip(values, 0, top) * 255 * 2 + top) // (2 * top)  # round(v * 255 / top), exactly
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")


def _float_grey(img: Image.Image) -> Image.Image:
    """A float greyscale image as 8-bit RGB: ``[0, 1]`` if its largest finite value is at most 1, else ``[0, 255]``."""
    values = np.asarray(img).astype(np.float64)
    finite = values[np.isfinite(values)]
    scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
    levels = np.rint(np.clip(np.nan_to_num(values * scale, nan=0.0), 0, 255))
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
