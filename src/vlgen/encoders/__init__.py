"""Visual encoders: pixels -> tokens ``[B, N, D]``."""

from vlgen.encoders.timm import TimmEncoder

__all__ = ["TimmEncoder"]
