"""LightningDataModules feeding raw images (or frames) and strings, or text alone; shared pieces; synthetic worlds."""

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
from vlgen.data.text import TextCorpusDataModule
from vlgen.data.video_text import VideoTextDataModule

__all__ = [
    "BadFiles",
    "BadRecords",
    "BadSample",
    "CaptionCollate",
    "CaptionSample",
    "ImageTextDataModule",
    "ShapesWorld",
    "TextCorpusDataModule",
    "VideoTextDataModule",
    "drop_bad",
    "make_loader",
    "read_records",
]
