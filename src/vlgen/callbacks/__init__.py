"""Lightning callbacks of vlgen."""

from vlgen.callbacks.caption_table import CaptionTable
from vlgen.callbacks.merge_ramp import MergeRamp

__all__ = ["CaptionTable", "MergeRamp"]
