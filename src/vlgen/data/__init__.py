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
from vlgen.data.webdataset import ImageShardDataModule, Source, TextShardDataModule, VideoShardDataModule

__all__ = [
    "BadFiles",
    "BadRecords",
    "BadSample",
    "CaptionCollate",
    "CaptionSample",
    "ImageShardDataModule",
    "ImageTextDataModule",
    "ShapesWorld",
    "Source",
    "TextCorpusDataModule",
    "TextShardDataModule",
    "VideoShardDataModule",
    "VideoTextDataModule",
    "drop_bad",
    "make_loader",
    "read_records",
]
