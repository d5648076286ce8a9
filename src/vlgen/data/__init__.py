"""LightningDataModules feeding raw images (or frames) and strings, or text alone; shared pieces; synthetic worlds.

A new dataset format is one file here: for annotation files plus a media folder, a
:class:`~vlgen.data.captions.CaptionDataModule` that says how one sample loads (``_dataset``); otherwise any
``LightningDataModule`` whose loaders yield :class:`~vlgen.interfaces.CaptionBatch` (or ``TextBatch``). Add a
``data_modules/<name>.yaml`` with the expected layout in a comment.
"""

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
from vlgen.data.vqa import VQATask, clean_question
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
    "VQATask",
    "VideoShardDataModule",
    "VideoTextDataModule",
    "clean_question",
    "drop_bad",
    "make_loader",
    "read_records",
]
