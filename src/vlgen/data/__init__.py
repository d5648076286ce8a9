"""LightningDataModules that feed raw images (or frames) and strings, the pieces they share, and synthetic worlds."""

from vlgen.data.common import (
    BadFiles,
    BadRecords,
    BadSample,
    CaptionCollate,
    CaptionSample,
    drop_bad,
    make_loader,
    read_records,
)
from vlgen.data.image_text import ImageTextDataModule
from vlgen.data.synthetic import ShapesWorld

__all__ = [
    "BadFiles",
    "BadRecords",
    "BadSample",
    "CaptionCollate",
    "CaptionSample",
    "ImageTextDataModule",
    "ShapesWorld",
    "drop_bad",
    "make_loader",
    "read_records",
]
