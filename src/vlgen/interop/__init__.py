"""Interoperability with other frameworks' checkpoints: Hugging Face BLIP-2 import and export."""

from vlgen.interop.hf_blip2 import export_hf_blip2, load_hf_blip2

__all__ = ["export_hf_blip2", "load_hf_blip2"]
