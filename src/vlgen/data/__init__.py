"""LightningDataModules: image-text, video-text and text-only corpora, and the synthetic worlds."""

from vlgen.data.image_text import ImageTextDataModule
from vlgen.data.synthetic import ShapesWorld

__all__ = ["ImageTextDataModule", "ShapesWorld"]
