"""Every YAML in configs/ and data_modules/ parses through the real CLI (`--print_config`), with nothing built."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from vlgen.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "tiny" / "linear.yaml"
PARTS = REPO / "configs" / "tiny" / "parts"  # blocks the tiny configs share: no configs, tested through their users
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if PARTS not in p.parents)
DATA = sorted((REPO / "data_modules").glob("*.yaml"))
BASES = {"shards_video.yaml": REPO / "configs" / "tiny" / "video_evlgen.yaml"}  # an overlay's own base, else BASE


def is_overlay(path: Path) -> bool:
    """An overlay changes parts of a complete config (it has no model class_path of its own)."""
    model = yaml.safe_load(path.read_text()).get("model") or {}
    return "class_path" not in model


_resolved: dict[tuple[Path, ...], dict] = {}


def print_config(capsys, *configs: Path) -> dict:
    if configs not in _resolved:  # each resolution takes seconds; several tests read the same ones
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"])
        assert exit_info.value.code in (0, None)
        _resolved[configs] = yaml.safe_load(capsys.readouterr().out)
    return copy.deepcopy(_resolved[configs])


def composed(path: Path) -> tuple[Path, ...]:
    """``path`` as it runs: alone, or an overlay on its base config."""
    return (BASES.get(path.name, BASE), path) if is_overlay(path) else (path,)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_experiment_config_parses(path, capsys):
    resolved = print_config(capsys, *composed(path))
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
    generate = resolved["data"]["init_args"].get("generate")
    if not isinstance(data["init_args"].get("generate"), dict):  # a real dataset, not a synthetic world
        assert generate is None, f"{path.name} keeps the model config's synthetic world: set generate: null"


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


def _components(node, found: list[dict]) -> list[dict]:
    """Every class_path/init_args block inside a resolved config, nested ones included."""
    if isinstance(node, dict):
        if "class_path" in node:
            found.append(node)
        for value in node.values():
            _components(value, found)
    elif isinstance(node, list):
        for value in node:
            _components(value, found)
    return found


def _built_files(capsys) -> dict[str, dict[str, dict]]:
    """For each file or folder that a component writes when it is missing: what each config resolves it to."""
    built: dict[str, dict[str, dict]] = {}
    for configs in [composed(p) for p in CONFIGS] + [(BASE, p) for p in DATA]:
        name = " + ".join(str(c.relative_to(REPO)) for c in configs)
        for block in _components(print_config(capsys, *configs), []):
            args = block.get("init_args") or {}
            if args.get("build_if_missing") and args.get("checkpoint_path"):  # an encoder pre-trained into a file
                weights = {k: v for k, v in args.items() if k != "feature_stage"}  # any stage reads the same file
                built.setdefault(args["checkpoint_path"], {})[name] = {"class_path": block["class_path"], **weights}
            if args.get("build_if_missing") and args.get("name_or_path"):  # an LM pre-trained into a folder
                built.setdefault(args["name_or_path"], {})[name] = args["build_if_missing"]
            world = args.get("world") or args.get("generate")  # a synthetic world, written to its root folder
            root = str(Path(args["train_files"][0]).parent) if args.get("train_files") else args.get("world_root")
            root = root or args.get("root")
            if root and isinstance(world, dict) and world["class_path"].endswith("World"):
                built.setdefault(root, {})[name] = world
    return built


def test_configs_that_build_the_same_file_resolve_it_alike(capsys):
    """The first run writes a pre-trained encoder, LM or a world; any config's later runs read it, so all must agree.

    The tiny configs get these from configs/tiny/parts/; this checks what each config resolves them to.
    """
    built = _built_files(capsys)
    encoder_users = {"linear", "evlgen", "pformer_align", "blip2_stage1", "blip2_stage2", "video_evlgen"}
    lm_users = {"linear", "evlgen", "pformer_align", "pformer_stage0", "blip2_stage2"}
    world_users = encoder_users - {"video_evlgen"} | {"pformer_stage0"}
    assert {f"configs/tiny/{n}.yaml" for n in encoder_users} <= set(built["data/shapes-tiny-encoder.pth"])
    assert {f"configs/tiny/{n}.yaml" for n in lm_users} <= set(built["data/shapes-tiny-lm"])
    assert {f"configs/tiny/{n}.yaml" for n in world_users} <= set(built["data/shapes-tiny"])
    assert "configs/tiny/video_evlgen.yaml + configs/tiny/shards_video.yaml" in built["data/shapes-video"]
    for target, by_config in built.items():
        first = next(iter(by_config.values()))
        assert all(block == first for block in by_config.values()), (target, by_config)


def test_tiny_configs_name_the_shared_parts_instead_of_copying_them():
    """World, tiny encoder and tiny LM are written once, in configs/tiny/parts/; every part there is used."""
    parts = sorted(PARTS.glob("*.yaml"))
    tiny = sorted((REPO / "configs" / "tiny").glob("*.yaml"))
    for path in tiny:
        body = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for copied in ("ShapesWorld", "ShapesTinyEncoder", "shapes-tiny-encoder", "shapes-tiny-lm"):  # Moving... too
            assert copied not in body, f"{path.name} copies {copied}: name its file in configs/tiny/parts/"
    text = "\n".join(p.read_text() for p in tiny + parts)
    unused = [p.name for p in parts if not re.search(rf":\s+(parts/)?{re.escape(p.name)}(\s|$)", text)]
    assert parts and not unused, unused
