"""Lightning callbacks of vlgen."""

from vlgen.callbacks.caption_table import CaptionTable
from vlgen.callbacks.grounding import GroundingMonitor
from vlgen.callbacks.merge_ramp import MergeRamp
from vlgen.callbacks.progress import PlainProgress
from vlgen.callbacks.requeue import Requeue
from vlgen.callbacks.time_budget import TimeBudget

__all__ = ["CaptionTable", "GroundingMonitor", "MergeRamp", "PlainProgress", "Requeue", "TimeBudget"]
