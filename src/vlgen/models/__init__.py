"""LightningModules that compose encoders, bridges and language models."""

from vlgen.models.base import Optim, VLModule
from vlgen.models.captioner import Captioner

__all__ = ["Captioner", "Optim", "VLModule"]
