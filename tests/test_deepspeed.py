"""DeepSpeed without a GPU: the cluster overlay composes with every paper config, its strategy object builds as the
overlay describes it, a DeepSpeed checkpoint directory is read by DeepSpeed's strategy only (elsewhere one line
says how to consolidate it), and on the CPU the strategy stops with one line before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from vlgen.cli import check_ckpt_path, main
from vlgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "configs" / "cluster" / "slurm_deepspeed.yaml"
PAPER = [
    ("blip2", "stage1.yaml"),
    ("blip2", "stage2_opt2.7b.yaml"),
    ("pformer", "stage0.yaml"),
    ("evlgen", "opt2.7b.yaml"),
    ("evlgen", "video_msrvtt.yaml"),
]


@pytest.mark.parametrize("config", PAPER, ids=lambda c: "/".join(c))
def test_the_overlay_composes_with_the_paper_configs(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / Path(*config)), "--config", str(OVERLAY), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    strategy = resolved["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 2 and strategy["init_args"]["exclude_frozen_parameters"] is True
    assert resolved["trainer"]["precision"] == "bf16-mixed"
    callbacks = [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    assert callbacks[-1] == "vlgen.callbacks.Requeue" and len(callbacks) > 1  # added to the experiment's own


@pytest.mark.parametrize("stage", [2, 3])
def test_the_strategy_builds_from_the_overlay(stage):
    pytest.importorskip("deepspeed")  # `make install` installs it
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

    section = yaml.safe_load(OVERLAY.read_text())["trainer"]["strategy"]
    section["init_args"]["stage"] = stage  # as --trainer.strategy.init_args.stage 3 does
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": section})).strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.exclude_frozen_parameters  # checkpoints hold the trainable weights only
    assert strategy.zero_stage_3 is (stage == 3)


def deepspeed_dir(root: Path) -> Path:
    """The layout Lightning's DeepSpeed strategy saves a checkpoint in (a directory, DeepSpeed's files inside)."""
    out = root / "last.ckpt"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (out / "latest").write_text("checkpoint")
    return out


def test_a_deepspeed_checkpoint_directory_is_deepspeeds_to_read(tmp_path):
    path = str(deepspeed_dir(tmp_path))
    check_ckpt_path(path, Namespace(strategy=Namespace(class_path="lightning.pytorch.strategies.DeepSpeedStrategy")))
    check_ckpt_path(path, Namespace(strategy="deepspeed_stage_3"))
    with pytest.raises(ConfigError) as err:  # under DDP (a one-GPU `vlgen test`): how to make one file of it
        check_ckpt_path(path, Namespace(strategy="ddp"))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"--ckpt_path {path}: a DeepSpeed checkpoint directory")
    assert "convert_zero_checkpoint_to_fp32_state_dict" in line
    with pytest.raises(ConfigError, match="cannot read"):  # a directory of anything else is still no checkpoint
        check_ckpt_path(str(tmp_path), Namespace(strategy="deepspeed_stage_2"))


def test_the_overlay_on_the_cpu_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "tiny" / "linear.yaml"), "--config", str(OVERLAY),
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vlgen: error: trainer.strategy lightning.pytorch.strategies.DeepSpeedStrategy: DeepSpeed needs CUDA GPUs, "
        "and this run is on the CPU; shard on CPUs with FSDP2: --config configs/cluster/cpu_fsdp2.yaml "
        "(lightning.pytorch.strategies.ModelParallelStrategy)"
    ]
