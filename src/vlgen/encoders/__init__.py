"""Visual encoders: pixels -> tokens ``[B, N, D]``."""

from vlgen.encoders.hf_vision import HFBlip2Vision
from vlgen.encoders.timm import TimmEncoder

__all__ = ["HFBlip2Vision", "TimmEncoder"]
