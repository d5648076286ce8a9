"""What ``vlgen convert`` does: BLIP-2 directories to vlgen checkpoints + configs, and vlgen checkpoints back.

A converted checkpoint has the format of the lean checkpoints vlgen's Lightning runs write (the trainable weights
under ``state_dict``; frozen parts are rebuilt from the config), so ``vlgen test --ckpt_path`` and
``vlgen fit --ckpt_path`` read it like any other. The config written beside it holds only the ``model:`` section,
pointing at the BLIP-2 directory for the frozen vision tower and LLM; a data module config is added with a second
``--config``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml

from vlgen.errors import ConfigError
from vlgen.interop.hf_blip2 import export_hf_blip2, load_hf_blip2, model_spec
from vlgen.loading import DType, read_checkpoint
from vlgen.models import Captioner

log = logging.getLogger(__name__)


def lean_checkpoint(model: Captioner) -> dict[str, Any]:
    """A checkpoint as ``Trainer.save_checkpoint`` writes it for a model that has not trained yet."""
    checkpoint: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    model.on_save_checkpoint(checkpoint)  # keeps the trainable weights only
    return checkpoint


def from_hf_blip2(src: str, out_ckpt: str | Path, prompt: str = "", dtype: DType = "float32") -> tuple[Path, Path]:
    """Convert BLIP-2 directory ``src`` into ``out_ckpt`` and ``out_ckpt`` with a ``.yaml`` suffix.

    Returns:
        ``(checkpoint path, config path)``.
    """
    if not Path(src).is_dir():
        raise ConfigError(f"convert: {src} is not a directory")
    src = str(Path(src).resolve())  # the config must work from any working directory
    model = load_hf_blip2(src, prompt=prompt, dtype=dtype)
    ckpt_path = Path(out_ckpt)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lean_checkpoint(model), ckpt_path)
    config_path = ckpt_path.with_suffix(".yaml")
    header = (
        f"# BLIP-2 {src} as a vlgen model (written by vlgen convert hf-blip2).\n"
        f"#   vlgen test --config {config_path} --config data_modules/DATA.yaml --ckpt_path {ckpt_path}\n"
    )
    body = yaml.safe_dump({"model": model_spec(src, prompt, model.llm.decoding, dtype)}, sort_keys=False)
    config_path.write_text(header + body)
    log.info("wrote %s and %s", ckpt_path, config_path)
    return ckpt_path, config_path


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_model(configs: list[str]) -> Captioner:
    """The ``model:`` of one or more vlgen config files (merged in order, later files win), instantiated."""
    from jsonargparse import ArgumentParser

    merged: dict[str, Any] = {}
    for file in configs:
        if not Path(file).is_file():
            raise ConfigError(f"convert --config: {file} does not exist")
        merged = _merge(merged, yaml.safe_load(Path(file).read_text()) or {})
    if "model" not in merged:
        raise ConfigError(f"convert --config: no model section in {', '.join(configs)}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Captioner, "model", required=True)
    cfg = parser.parse_object({"model": merged["model"]})
    return parser.instantiate_classes(cfg).model


def to_hf_blip2(ckpt: str | Path, out_dir: str | Path, configs: list[str]) -> Path:
    """Rebuild the model of ``configs``, load checkpoint ``ckpt`` into it and export it to ``out_dir``."""
    model = build_model(configs)
    checkpoint = read_checkpoint(ckpt, "convert")
    try:
        model.on_load_checkpoint(checkpoint)  # every trainable weight must be there
    except KeyError as err:
        raise ConfigError(f"convert: {ckpt}: {err.args[0]}") from None
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    return export_hf_blip2(model.eval(), out_dir)
