"""Every YAML in configs/ and data_modules/ parses through the real CLI (`--print_config`), with nothing built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlgen.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "tiny" / "linear.yaml"
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DATA = sorted((REPO / "data_modules").glob("*.yaml"))


def is_overlay(path: Path) -> bool:
    """An overlay changes parts of a complete config (it has no model class_path of its own)."""
    model = yaml.safe_load(path.read_text()).get("model") or {}
    return "class_path" not in model


def print_config(capsys, *configs: Path) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_experiment_config_parses(path, capsys):
    configs = [BASE, path] if is_overlay(path) else [path]
    resolved = print_config(capsys, *configs)
    assert resolved["model"]["class_path"].startswith("vlgen.")
    assert resolved["data"]["class_path"].startswith("vlgen.")


@pytest.mark.parametrize("path", DATA, ids=lambda p: p.name)
def test_data_module_composes_with_a_model_config(path, capsys):
    resolved = print_config(capsys, BASE, path)
    data = yaml.safe_load(path.read_text())["data"]
    assert resolved["data"]["class_path"] == data["class_path"]
    for key, value in data["init_args"].items():  # the data file's values win over the model config's
        if not isinstance(value, dict):
            assert resolved["data"]["init_args"][key] == value, key


def test_overrides_swap_a_component(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(BASE),
                "--model.bridge",
                "vlgen.bridges.MLPProjector",
                "--model.bridge.init_args.num_layers",
                "3",
                "--print_config",
            ]
        )
    bridge = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["bridge"]
    assert bridge == {
        "class_path": "vlgen.bridges.MLPProjector",
        "init_args": {"num_layers": 3, "hidden_dim": None, "layer_norm": True, "dropout": 0.0},
    }


def test_tiny_configs_that_share_the_encoder_file_build_and_read_it_alike():
    """The first run writes data/shapes-tiny-encoder.pth; every other config reads it, so all must agree on it."""
    encoders = {}
    for path in CONFIGS:
        encoder = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args", {}).get("encoder")
        if encoder and "image" in encoder.get("init_args", {}):  # a video encoder: its per-frame image encoder
            encoder = encoder["init_args"]["image"]
        if encoder and encoder["init_args"].get("checkpoint_path") == "data/shapes-tiny-encoder.pth":
            weights = ("class_path", "name", "model_kwargs", "transform", "build_if_missing")  # what shapes the file
            encoders[path.name] = {k: encoder["init_args"].get(k, encoder.get(k)) for k in weights}
    assert {
        "linear.yaml",
        "blip2_stage1.yaml",
        "blip2_stage2.yaml",
        "pformer_align.yaml",
        "evlgen.yaml",
        "video_evlgen.yaml",
    } <= set(encoders)
    first = next(iter(encoders.values()))
    assert all(e == first for e in encoders.values()), encoders
