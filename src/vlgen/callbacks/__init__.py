"""Lightning callbacks of vlgen."""

from vlgen.callbacks.caption_table import CaptionTable

__all__ = ["CaptionTable"]
