"""The `vlgen` command stops with one line on a bad checkpoint or YAML file, and runs never overwrite one another:
a logger-less fit takes its own checkpoint directory, a fixed run directory holding results is refused (unless
``--overwrite true``, or a resume), ``--trainer.default_root_dir`` moves the default logger, checkpoint writes are
atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, tiny_encoder, tiny_lm, vlgen

from vlgen.cli import AtomicCheckpointIO, check_config_files, restore_nulls
from vlgen.errors import ConfigError
from vlgen.loading import read_checkpoint

TINY = REPO / "configs" / "tiny" / "linear.yaml"
SMALL_WORLD = {"seed": 0, "num_train": 40, "num_val": 8, "num_test": 8, "num_text": 300}


def one_error_line(proc) -> str:
    """The error line of a run that stopped on a configuration mistake (rc 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlgen: error: ")
    return last


def save_ckpt(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(256)}, "global_step": 0}, path)
    return path


# --- checkpoints that cannot be read -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_bad_ckpt_path_stops_with_one_line_naming_it(tmp_path, kind):
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        data = save_ckpt(tmp_path / "good.ckpt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("model weights, honest\n")
    proc = vlgen("test", "--config", str(TINY), "--ckpt_path", str(bad), cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert line.startswith(f"vlgen: error: --ckpt_path {bad}: not a readable checkpoint (truncated or not a torch file")


def test_read_checkpoint_names_the_option_and_why(tmp_path):
    good = save_ckpt(tmp_path / "good.ckpt")
    assert read_checkpoint(good, "model.init_from")["global_step"] == 0
    assert read_checkpoint(good, "--ckpt_path", mmap=True)["state_dict"]["w"].shape == (256,)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:300])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "nosd.pt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases = {
        "cut.ckpt": "PytorchStreamReader failed",
        "tensor.pt": "it holds a Tensor, not a Lightning checkpoint",
        "nosd.pt": "it holds a dict without a state_dict",
        "empty.ckpt": "the file is empty",
    }
    for name, why in cases.items():
        path = tmp_path / name
        with pytest.raises(ConfigError) as err:
            read_checkpoint(path, "bridge.init_from")
        message = str(err.value)
        assert message.startswith(f"bridge.init_from: {path}: not a readable checkpoint (truncated or not a torch")
        assert why in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^--ckpt_path: cannot read .*missing\.ckpt: No such file"):
        read_checkpoint(tmp_path / "missing.ckpt", "--ckpt_path")


# --- YAML files -----------------------------------------------------------------------------------------------------
BROKEN_YAML = "trainer:\n  max_steps: 2\n  devices: [1, 2\nmodel: {}\n"


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN_YAML)
    proc = vlgen("fit", "--config", str(TINY), "--config", str(bad), cwd=tmp_path, check=False)
    line = one_error_line(proc)
    assert line.startswith(f"vlgen: error: --config {bad}: YAML syntax error at line 4, column 6: ")
    assert "<unicode string>" not in proc.stderr


def test_config_files_checked_in_every_spelling(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN_YAML)
    (tmp_path / "good.yaml").write_text("trainer: {max_steps: 2}\n")
    for argv, start in [
        (["fit", f"--config={bad}"], f"--config {bad}: YAML syntax error at line 4, column 6"),
        (["fit", "-c", str(bad)], f"-c {bad}: YAML syntax error at line 4"),
        (["fit", "--data", str(bad)], f"--data {bad}: YAML syntax error at line 4"),
        (["fit", "--config", str(tmp_path / "nope.yaml")], f"--config {tmp_path / 'nope.yaml'}: no such file"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_config_files(argv)
        assert str(err.value).startswith(start), str(err.value)
    # good files, inline YAML, values that are not files pass
    check_config_files(["fit", "--config", str(tmp_path / "good.yaml"), "--config", "{trainer: {max_steps: 3}}"])
    check_config_files(["fit", "--trainer.logger", "false", "--data.root", str(tmp_path / "missing.yaml")])


# --- atomic checkpoint writes ---------------------------------------------------------------------------------------
class AnyBridge:
    pass


class Bridge(AnyBridge):
    def __init__(self, init_from: str | None = "stage1.ckpt", name: str = "qformer") -> None:
        pass


class Model:
    def __init__(self, bridge: AnyBridge, path: str | None = "p") -> None:
        pass


@pytest.mark.parametrize(
    "given",
    [
        ["--model.init_args.bridge.init_args.init_from", "null"],
        ["--model.init_args.bridge.init_args.init_from=null"],
        ["--model.bridge.init_from", "null"],  # jsonargparse's shorthand
    ],
)
def test_a_nested_null_on_the_command_line_arrives_as_none(given):
    """A subclass inside a subclass: jsonargparse hands over ``"None"`` for ``null``; the CLI gives ``None`` back, to
    that key only (a literal string elsewhere stays as it is)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Model, "model")
    argv = ["--model", f"{__name__}.Model", "--model.init_args.bridge", f"{__name__}.Bridge", *given]
    argv += ["--model.init_args.bridge.init_args.name", "None"]
    config = parser.parse_args(argv)
    bridge = config.model.init_args.bridge.init_args
    assert bridge.init_from == "None"  # what jsonargparse does; if this fails, restore_nulls may be dropped
    restore_nulls(config, argv)
    assert bridge.init_from is None and bridge.name == "None"


def test_checkpoint_write_killed_midway_keeps_the_old_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 1}, target)
    old = target.read_bytes()

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop it: the target must not be touched

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the partial file is gone
    io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 3}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3


def test_a_killed_writer_leaves_only_a_partial_file_beside_the_target(tmp_path):
    """A real kill (SIGKILL mid-write) cannot run cleanup: the target stays whole, a ``.tmp-<pid>`` file remains."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 1}, target)
    script = (
        "import os, signal, sys, torch\n"
        "from vlgen.cli import AtomicCheckpointIO\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    f.write(b'PK\\x03\\x04 partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save\n"
        "AtomicCheckpointIO().save_checkpoint({'state_dict': {}, 'global_step': 2}, sys.argv[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name.startswith("last.ckpt.tmp-") for p in tmp_path.iterdir() if p != target] == [True]


# --- real runs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small world, encoder and LM (a few steps each) and an override config running 2 steps."""
    work = tmp_path_factory.mktemp("stops")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": SMALL_WORLD}
    encoder = tiny_encoder(work, world)
    encoder["build_if_missing"]["init_args"].update(num_images=32, steps=3)
    override = {
        "trainer": {
            "max_steps": 2, "limit_val_batches": 1, "limit_test_batches": 1, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "encoder": {"init_args": encoder},
                "llm": {"init_args": tiny_lm(work, world, steps=3)},
                "optim": {"warmup_steps": 1},
            }
        },
        "data": {
            "init_args": {
                "root": str(work / "shapes"), "generate": world, "batch_size": 8, "eval_batch_size": 8,
                "num_workers": 0,
            }
        },
    }  # fmt: skip
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    return work


def args(work: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--config", str(work / "override.yaml"), *extra]


@pytest.fixture(scope="module")
def fitted(workdir) -> Path:
    """``last.ckpt`` of a 2-step fit into the fixed run directory ``runs/vlgen/base``."""
    vlgen("fit", *args(workdir, "--trainer.logger.init_args.version", "base"), cwd=workdir)
    return workdir / "runs" / "vlgen" / "base" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_logger_less_fits_get_their_own_checkpoint_dirs(workdir, fitted):
    root = workdir / "nolog"
    for _ in range(2):
        vlgen("fit", *args(workdir, "--trainer.logger", "false", "--trainer.default_root_dir", str(root)), cwd=workdir)
    runs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.ckpt"))
    assert runs == ["checkpoints/run_0/last.ckpt", "checkpoints/run_1/last.ckpt"]
    # a resumed logger-less fit continues in its own run's directory
    resumed = root / "checkpoints" / "run_0" / "last.ckpt"
    vlgen("fit", *args(workdir, "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
                       "--trainer.max_steps", "3", "--ckpt_path", str(resumed)), cwd=workdir)  # fmt: skip
    assert torch.load(resumed, weights_only=False)["global_step"] == 3
    assert not (root / "checkpoints" / "run_2").exists()


@pytest.mark.slow
def test_second_test_into_a_fixed_run_dir_is_refused_unless_overwrite(workdir, fitted):
    fixed = ("--ckpt_path", str(fitted), "--trainer.logger.init_args.version", "evaluated")
    vlgen("test", *args(workdir, *fixed), cwd=workdir)
    run = workdir / "runs" / "vlgen" / "evaluated"
    first = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({"marker": 1}))  # so that a replacement shows

    line = one_error_line(vlgen("test", *args(workdir, *fixed), cwd=workdir, check=False))
    assert "error: runs/vlgen/evaluated already holds metrics.json" in line  # the directory as configured
    assert "--trainer.logger.init_args.version" in line
    assert "--overwrite true" in line
    assert json.loads((run / "metrics.json").read_text()) == {"marker": 1}  # untouched

    vlgen("test", *args(workdir, *fixed, "--overwrite", "true"), cwd=workdir)
    assert json.loads((run / "metrics.json").read_text()).keys() == first.keys()


@pytest.mark.slow
def test_fresh_fit_into_a_run_dir_with_checkpoints_is_refused_but_resume_is_allowed(workdir, fitted):
    base = ("--trainer.logger.init_args.version", "base")
    line = one_error_line(vlgen("fit", *args(workdir, *base), cwd=workdir, check=False))
    assert "error: runs/vlgen/base already holds checkpoints/*.ckpt" in line
    vlgen("fit", *args(workdir, *base, "--trainer.max_steps", "3", "--ckpt_path", str(fitted)), cwd=workdir)
    assert torch.load(fitted, weights_only=False)["global_step"] == 3
    # a test of that checkpoint may put its results beside it, once
    vlgen("test", *args(workdir, *base, "--ckpt_path", str(fitted)), cwd=workdir)
    assert (fitted.parent.parent / "metrics.json").is_file()
    one_error_line(vlgen("test", *args(workdir, *base, "--ckpt_path", str(fitted)), cwd=workdir, check=False))


@pytest.mark.slow
def test_default_root_dir_moves_the_default_logger_and_checkpoints(workdir, fitted):
    elsewhere = workdir / "elsewhere"
    vlgen("fit", *args(workdir, "--trainer.default_root_dir", str(elsewhere)), cwd=workdir)
    found = sorted(p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*.ckpt"))
    assert found == ["vlgen/version_0/checkpoints/last.ckpt"]
    assert (elsewhere / "vlgen" / "version_0" / "metrics.csv").is_file()
    assert not (workdir / "runs" / "vlgen" / "version_0").exists()


@pytest.mark.slow
def test_cli_installs_the_atomic_checkpoint_io(workdir, fitted, monkeypatch):
    from lightning.pytorch import LightningDataModule, LightningModule

    from vlgen.cli import VLGenCLI

    monkeypatch.chdir(workdir)
    cli = VLGenCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        auto_configure_optimizers=False, run=False, args=args(workdir),
    )  # fmt: skip
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_a_logger_whose_package_is_missing_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """TensorBoard named in the config but not installed: one line, exit 2 (Lightning's boring model stands in for a
    vlgen model; the logger is built with the trainer)."""
    import importlib.util

    from vlgen.cli import main

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("TensorBoard is installed here")
    monkeypatch.chdir(tmp_path)
    boring = "lightning.pytorch.demos.boring_classes"
    argv = ["fit", "--model", f"{boring}.BoringModel", "--data", f"{boring}.BoringDataModule",
            "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", str(tmp_path), "--trainer.max_steps", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vlgen: error: a package is missing:") and "tensorboard" in err
