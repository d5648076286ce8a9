"""LightningModules that compose encoders, bridges and language models (and the objectives that train them)."""

from vlgen.models.base import Optim, VLModule
from vlgen.models.blip2_stage1 import Blip2Stage1
from vlgen.models.captioner import Captioner
from vlgen.models.pformer_stage0 import PFormerStage0

__all__ = ["Blip2Stage1", "Captioner", "Optim", "PFormerStage0", "VLModule"]
