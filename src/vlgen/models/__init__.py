"""LightningModules that compose encoders, bridges and language models."""

from vlgen.models.base import Optim, VLModule
from vlgen.models.blip2_stage1 import Blip2Stage1
from vlgen.models.captioner import Captioner

__all__ = ["Blip2Stage1", "Captioner", "Optim", "VLModule"]
