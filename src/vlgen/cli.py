"""The ``vlgen`` command: Lightning's CLI (``fit``, ``validate``, ``test``, ``predict``) plus a few verbs of ours.

Models and data modules are chosen in YAML with ``class_path`` / ``init_args``; several ``--config`` files compose
(one for the model and trainer, one from ``data_modules/`` for the data). Extra verbs:

* ``vlgen make-world ROOT [--world.seed ...]``: write the synthetic shapes world to ``ROOT``.
* ``vlgen make-shards captions ANNOTATIONS MEDIA_ROOT OUT_DIR [--field video] [--eval]`` or ``vlgen make-shards
  text FILE... OUT_DIR``: COCO / Karpathy / MSR-VTT-style JSON + media, or sentence files, as WebDataset tar shards
  (img2dataset's layout) for the shard data modules.
* ``vlgen convert hf-blip2 SRC_DIR OUT.ckpt [--prompt TEXT] [--dtype float16]``: a Hugging Face BLIP-2 directory
  as a vlgen checkpoint (trainable weights, the format of vlgen's Lightning checkpoints) plus ``OUT.yaml``, the
  ``model:`` config that rebuilds it, for ``vlgen test --config OUT.yaml --config data_modules/X.yaml --ckpt_path
  OUT.ckpt``.
* ``vlgen convert to-hf-blip2 CKPT OUT_DIR --config CONFIG.yaml``: rebuild the model of ``CONFIG.yaml``, load
  ``CKPT`` and write a ``Blip2ForConditionalGeneration`` directory with its processor.
* ``vlgen report RUN_DIR [--world ROOT] [--curves [OUT.png]]``: what a test run scored, a few captions, and on a
  synthetic world the share of captions that state the world's ground-truth facts; for a fit run, a summary of its
  training; with ``--curves``, its loss, grounding and validation curves drawn from the CSV logs
  (:mod:`vlgen.report`, :mod:`vlgen.curves`).

A configuration mistake (an unknown key, a path that does not exist) stops the run with one line naming it, before
anything is built: a ``--config`` file (or another argument naming a ``.yaml`` file) with a YAML syntax error is named
with the line and column; a ``--ckpt_path`` that is missing, truncated or not a Lightning checkpoint is named too; so
is a strategy that needs GPUs (Lightning's FSDP, DeepSpeed) on the CPU, where FSDP2 (``configs/cluster/cpu_fsdp2.yaml``)
shards instead.

Runs never overwrite one another:

* The default CSV logger writes under ``--trainer.default_root_dir`` (``runs`` unless given) unless its ``save_dir``
  is set to something else.
* With ``--trainer.logger false`` each ``fit`` writes its checkpoints into a fresh ``DIR/checkpoints/run_N``
  (``DIR`` the ``default_root_dir``; N one more than the largest there), so two fits in one root never interleave
  their checkpoints; a fit resumed from ``DIR/checkpoints/run_N/X.ckpt`` continues in ``run_N``. A ModelCheckpoint
  with its own ``dirpath`` keeps it.
* A run whose log directory is fixed before it starts (a logger with a fixed ``version``; ``default_root_dir``
  without a logger; a first logger other than CSV / TensorBoard logs into its ``save_dir``) is refused, with one
  line, when that directory already holds ``metrics.json``, ``predictions.jsonl``, ``gallery.html`` or (with a logger)
  ``checkpoints/*.ckpt`` of an earlier run. A run that continues the run of that directory (its ``--ckpt_path`` lies
  inside it, or is ``last``) may go on: a ``fit`` resumes; a ``test`` or ``predict`` may add its results beside the
  checkpoints but not replace earlier results. ``--overwrite true`` lifts the refusal. Without a logger only the
  files a run would replace count (``metrics.json`` and ``predictions.jsonl`` of ``test``, ``predict``).
* Checkpoints are written atomically on any filesystem (:class:`AtomicCheckpointIO`: a temporary file beside the
  target, fsync, ``os.replace``); Lightning's own write goes through a file in the system temp directory and, when
  that is another filesystem, copies it over the target, so a kill mid-copy leaves a truncated ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from vlgen.errors import ConfigError, RunStopped

EXTRA_VERBS = ("make-world", "make-shards", "convert", "report")
DEFAULT_LOGGER = "lightning.pytorch.loggers.CSVLogger"
DEFAULT_ROOT = "runs"
YAML_SUFFIXES = (".yaml", ".yml")
CKPT_KEYWORDS = ("last", "best", "hpc")  # --ckpt_path values Lightning resolves itself (and "registry:...")
EARLIER_RESULTS = ("metrics.json", "predictions.jsonl", "gallery.html")
WRITES = {"test": EARLIER_RESULTS, "predict": ("predictions.jsonl",)}  # what each writes into the log dir


class VLGenCLI(LightningCLI):
    """LightningCLI with vlgen's defaults: CSV logs under ``runs/``, a progress bar (plain lines when the output is
    not a terminal: :class:`~vlgen.callbacks.PlainProgress`), seed 0."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_ROOT,
                "trainer.logger": {
                    "class_path": DEFAULT_LOGGER,
                    "init_args": {"save_dir": DEFAULT_ROOT, "name": "vlgen"},
                },
            }
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="start even when the run's log directory holds metrics.json, predictions.jsonl or checkpoints of "
            "an earlier run (they are replaced)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then read ``--ckpt_path`` once: a missing, truncated or foreign file stops here with one line."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            restore_nulls(self.config[subcommand], sys.argv[1:] if args is None else args)
            check_ckpt_path(self.config[subcommand].get("ckpt_path"), self.config[subcommand].get("trainer"))

    def before_instantiate_classes(self) -> None:
        """Refuse a strategy the accelerator cannot run (:func:`check_strategy`), point the default logger at
        ``default_root_dir`` and refuse a log directory holding an earlier run."""
        if not self.subcommand:
            return
        from vlgen.callbacks.progress import use_plain_progress

        use_plain_progress()  # a VLGEN_PROGRESS of neither plain nor bar stops here, before anything is built
        config = self.config[self.subcommand]
        check_strategy(config.trainer)
        follow_default_root_dir(config.trainer)
        if not config.get("overwrite") and rank_zero_only.rank == 0:
            refuse_earlier_run(self.subcommand, config.trainer, config.get("ckpt_path"))

    def after_instantiate_classes(self) -> None:
        """Give the model its ``model:`` config as resolved here, so that its checkpoints carry it (``vlgen.load``);
        give a logger-less fit its own checkpoint directory; write checkpoints atomically."""
        import yaml

        from vlgen.artifacts import attach_config

        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        section = dumped.get(self.subcommand, dumped) if self.subcommand else dumped
        attach_config(self.model, section.get("model"))
        if self.subcommand == "fit" and not self.trainer.loggers:
            own_checkpoint_dir(self.trainer, self.config.fit.get("ckpt_path"))
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not a CheckpointIO the user chose
            strategy.checkpoint_io = AtomicCheckpointIO()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the trainer, with :class:`~vlgen.callbacks.PlainProgress` for its progress bar when the output is
        not a terminal (:func:`wants_plain_progress`); the saved ``config.yaml`` does not name it."""
        from vlgen.callbacks.progress import PlainProgress

        settings = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if wants_plain_progress(settings, self.trainer_defaults):
            kwargs["callbacks"] = [*_as_list(settings.get("callbacks")), PlainProgress()]
        return super().instantiate_trainer(**kwargs)


def build_cli(args: list[str], cli_class: type[VLGenCLI] | None = None) -> VLGenCLI:
    """The CLI with ``args`` parsed and its classes built as ``vlgen fit`` builds them, without running anything
    (benchmarks and notebooks use the model and data of a config this way)."""
    return (cli_class or VLGenCLI)(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=args,
    )


def wants_plain_progress(trainer: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a trainer of these arguments (callbacks built) gets PlainProgress: its progress bar is on, no
    progress bar is among its callbacks (a user's choice stays), and there is no terminal or ``VLGEN_PROGRESS`` is
    ``plain`` (:func:`vlgen.callbacks.progress.use_plain_progress`)."""
    from lightning.pytorch.callbacks import ProgressBar

    from vlgen.callbacks.progress import use_plain_progress

    if trainer.get("enable_progress_bar") is False or trainer.get("barebones"):
        return False
    callbacks = [*_as_list(trainer.get("callbacks")), *_as_list(defaults.get("callbacks"))]
    return not any(isinstance(cb, ProgressBar) for cb in callbacks) and use_plain_progress()


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic on any filesystem.

    The checkpoint goes to ``PATH.tmp-<pid>`` in the target's directory, is fsync'ed and renamed over ``PATH``
    (``os.replace``, atomic within one filesystem): a write that fails or is killed midway leaves the earlier file
    whole (and at worst a stray ``.tmp-<pid>`` file). Remote paths (``s3://``...) go through Lightning's own write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class)."""
        if storage_options is not None or "://" in str(path) or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the filesystem allows a directory to be fsync'ed)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def restore_nulls(config: Namespace, argv: Any) -> None:
    """Give back ``None`` to the keys set to ``null`` on the command line.

    jsonargparse reads ``--model.init_args.bridge.init_args.init_from null`` (a subclass inside a subclass) as the
    string ``"None"``; a key the command line set to ``null`` and that arrived as ``"None"`` is put back to ``None``.
    """
    if not isinstance(argv, list | tuple):
        return
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and isinstance(argv[i + 1], str) else ""
        if value.strip() != "null":
            continue
        parent, last = config, key.split(".")
        for part in last[:-1]:
            if not isinstance(parent, Namespace):
                break
            if part not in parent and isinstance(parent.get("init_args"), Namespace):
                parent = parent.init_args  # the shorthand --model.bridge.x for --model.init_args.bridge.init_args.x
            parent = parent.get(part)
        if isinstance(parent, Namespace):
            if last[-1] not in parent and isinstance(parent.get("init_args"), Namespace):
                parent = parent.init_args
            if parent.get(last[-1]) == "None":
                parent[last[-1]] = None


def check_ckpt_path(ckpt_path: str | None, trainer: Namespace | None = None) -> None:
    """Read ``--ckpt_path`` once (tensors mapped, not read) so that a bad file stops the run with one line.

    Lightning's keywords (``last``, ``best``, ``hpc``, ``registry...``) and remote URLs are left to Lightning. A
    DeepSpeed checkpoint (a directory with ``checkpoint/``) is DeepSpeed's to read, under its strategy; under any
    other it stops with the one line that says how to consolidate it into a lean file.
    """
    if not ckpt_path or ckpt_path in CKPT_KEYWORDS or str(ckpt_path).startswith("registry") or "://" in ckpt_path:
        return
    if (Path(ckpt_path) / "checkpoint").is_dir():
        if strategy_name(trainer).startswith("deepspeed"):
            return
        raise ConfigError(
            f"--ckpt_path {ckpt_path}: a DeepSpeed checkpoint directory; resume it with the DeepSpeed strategy "
            '(configs/cluster/slurm_deepspeed.yaml), or write one file from it first: python -c "from '
            "lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict as c; "
            f"c('{ckpt_path}', 'consolidated.ckpt')\""
        )
    from vlgen.loading import read_checkpoint

    read_checkpoint(ckpt_path, "--ckpt_path", mmap=True)


def strategy_name(trainer: Namespace | None, short: bool = True) -> str:
    """The trainer's strategy as written (a registered name or a class path), or as a lower-case short name
    (``ddp``, ``deepspeed_stage_2``, ``deepspeedstrategy``)."""
    strategy = trainer.get("strategy") if trainer is not None else None
    name = strategy.get("class_path", "") if isinstance(strategy, Namespace) else str(strategy or "")
    return name.rsplit(".", 1)[-1].lower() if short else name


def check_strategy(trainer: Namespace) -> None:
    """Stop with one line, before anything is built, a strategy that cannot run on the accelerator: Lightning's
    FSDP (``fsdp``, ``FSDPStrategy``: FSDP1) and DeepSpeed need CUDA GPUs. Sharding on CPUs is FSDP2 through
    ``ModelParallelStrategy`` (``configs/cluster/cpu_fsdp2.yaml``)."""
    accelerator = trainer.get("accelerator")
    short = strategy_name(trainer)
    if not short.startswith(("fsdp", "deepspeed")):
        return
    device = accelerator.get("class_path", "") if isinstance(accelerator, Namespace) else str(accelerator or "auto")
    device = device.rsplit(".", 1)[-1].lower()
    on_cpu = device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        what = "DeepSpeed" if short.startswith("deepspeed") else "Lightning's FSDP (FSDP1)"
        raise ConfigError(
            f"trainer.strategy {strategy_name(trainer, short=False)}: {what} needs CUDA GPUs, and this run is on the "
            "CPU; shard on CPUs with FSDP2: "
            "--config configs/cluster/cpu_fsdp2.yaml (lightning.pytorch.strategies.ModelParallelStrategy)"
        )


def follow_default_root_dir(trainer: Namespace) -> None:
    """Move the default CSV logger's ``save_dir`` (still ``runs``) to a ``default_root_dir`` the user gave."""
    root, logger = trainer.get("default_root_dir"), trainer.get("logger")
    if not root or os.path.normpath(root) == DEFAULT_ROOT or not isinstance(logger, Namespace):
        return
    init_args = logger.get("init_args")
    if logger.get("class_path") == DEFAULT_LOGGER and init_args and init_args.get("save_dir") == DEFAULT_ROOT:
        init_args.save_dir = root


def fixed_log_dir(trainer: Namespace) -> tuple[Path | None, bool]:
    """The run's log directory (``Trainer.log_dir``'s rule) when it is known before the run, else None (a logger
    that takes a fresh ``version_N``); and whether the run has a logger."""
    logger = trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return Path(trainer.get("default_root_dir") or os.getcwd()), False
    if not isinstance(logger, Namespace) or not logger.get("class_path"):
        return None, True  # Lightning's default logger: a fresh version_N
    module, _, name = logger.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    init_args = logger.get("init_args")
    kwargs = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args or {})
    if isinstance(cls, type) and issubclass(cls, (CSVLogger, TensorBoardLogger)):
        return (None if kwargs.get("version") is None else Path(cls(**kwargs).log_dir)), True
    save_dir = kwargs.get("save_dir")
    return (Path(save_dir) if isinstance(save_dir, str) else None), True


def refuse_earlier_run(subcommand: str, trainer: Namespace, ckpt_path: str | None) -> None:
    """Stop (one line) a run whose fixed log directory holds results of an earlier run (see the module docstring)."""
    log_dir, has_logger = fixed_log_dir(trainer)
    if log_dir is None or not log_dir.is_dir():
        return
    found = [name for name in EARLIER_RESULTS if (log_dir / name).is_file()]
    if has_logger and any((log_dir / "checkpoints").glob("*.ckpt")):
        found.append("checkpoints/*.ckpt")
    continues = ckpt_path == "last" or (
        ckpt_path is not None and "://" not in ckpt_path and Path(ckpt_path).resolve().is_relative_to(log_dir.resolve())
    )
    replaced = [name for name in found if name in WRITES.get(subcommand, ())]
    if replaced or (found and has_logger and not continues):
        how = "--trainer.logger.init_args.version NAME" if has_logger else "--trainer.default_root_dir DIR"
        raise ConfigError(
            f"{log_dir} already holds {', '.join(found)} of an earlier run: choose another run directory with {how}, "
            "or pass --overwrite true to replace them"
        )


def own_checkpoint_dir(trainer: Any, ckpt_path: str | None) -> None:
    """Point a logger-less fit's ModelCheckpoints without a ``dirpath`` at a fresh ``ROOT/checkpoints/run_N``."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath is None]
    if not callbacks:
        return
    parent = Path(os.path.realpath(trainer.default_root_dir)) / "checkpoints"
    run_dir = None
    if ckpt_path and "://" not in ckpt_path and ckpt_path not in CKPT_KEYWORDS:
        source = Path(os.path.realpath(ckpt_path)).parent
        if source.parent == parent and source.name.startswith("run_"):
            run_dir = source  # a resumed fit continues in its run's directory
    if run_dir is None:
        taken = [int(p.name[4:]) for p in parent.glob("run_*") if p.name[4:].isdigit()]
        number = max(taken, default=-1) + 1
        while True:
            run_dir = parent / f"run_{number}"
            if rank_zero_only.rank != 0:  # rank 0's choice reaches every rank (ModelCheckpoint.setup broadcasts it)
                break
            try:
                run_dir.mkdir(parents=True)  # reserves it: a fit started at the same moment takes the next one
                break
            except FileExistsError:
                number += 1
    for callback in callbacks:
        callback.dirpath = str(run_dir)


def check_config_files(argv: list[str]) -> None:
    """Read the YAML files a command line names before jsonargparse does, so that a mistake in one is one line naming
    the file (jsonargparse names ``<unicode string>``): ``--config X`` / ``-c X`` / ``--config=X``, and any other
    ``--KEY X.yaml`` naming an existing file (``--data path.yaml``). A ``--config`` file that does not exist is named
    too (a value with ``:``, ``{`` or a newline is an inline YAML string, which jsonargparse reads itself)."""
    import yaml

    pairs = [tuple(arg.split("=", 1)) for arg in argv if arg.startswith("--") and "=" in arg]
    pairs += [(arg, value) for arg, value in itertools.pairwise(argv) if arg.startswith("-") and "=" not in arg]
    for flag, value in pairs:
        is_config = flag in ("--config", "-c")
        path = Path(value)
        if not path.is_file():
            if is_config and not any(c in value for c in ":{\n"):
                raise ConfigError(f"{flag} {value}: no such file")
            continue
        if not (is_config or value.lower().endswith(YAML_SUFFIXES)):
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            why = err.problem or err.context or type(err).__name__
            if err.problem and err.context and err.context_mark is not None:  # where the unfinished part began
                why += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
            raise ConfigError(f"{flag} {value}: YAML syntax error{at}: {why}") from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{flag} {value}: cannot read it as YAML: {str(err).splitlines()[0]}") from None


def _quiet_third_party() -> None:
    # Messages that are noise for users of a frozen LLM (e.g. "some weights are unused") stay out of the way.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen parts stay in eval
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "httpx", "urllib3", "timm"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_world(argv: list[str]) -> None:
    """``vlgen make-world ROOT``: write the synthetic shapes world (images, captions, text corpus)."""
    from jsonargparse import ArgumentParser

    from vlgen.data.synthetic import ShapesWorld

    parser = ArgumentParser(prog="vlgen make-world", description=make_world.__doc__)
    parser.add_argument("root", type=str, help="directory to write the world into")
    parser.add_class_arguments(ShapesWorld, "world")
    args = parser.parse_args(argv)
    world = parser.instantiate_classes(args).world
    print(world.write(args.root))


def make_shards(argv: list[str]) -> None:
    """``vlgen make-shards captions ANNOTATIONS MEDIA_ROOT OUT_DIR`` or ``vlgen make-shards text FILE... OUT_DIR``."""
    from vlgen.data.shards import write

    parser = argparse.ArgumentParser(prog="vlgen make-shards", description=make_shards.__doc__, exit_on_error=False)
    kinds = parser.add_subparsers(dest="kind", required=True)
    caps = kinds.add_parser("captions", help="annotation file + image or video folder -> shards")
    caps.add_argument("annotations", help="JSON list / JSONL / COCO captions file, as the JSON data modules read")
    caps.add_argument("media_root", help="the folder the records' image or video paths are relative to")
    caps.add_argument("out_dir", help="where 00000.tar, 00001.tar ... go")
    caps.add_argument("--field", default="image", choices=["image", "video"], help="the record field naming the file")
    caps.add_argument("--eval", action="store_true", help="one sample per image with every caption as a reference")
    caps.add_argument("--samples-per-shard", type=int, default=1000)
    text = kinds.add_parser("text", help="sentence files (.txt lines, .jsonl records) -> shards of KEY.txt")
    text.add_argument("paths", nargs="+", help="the files, then the output folder")
    text.add_argument("--text-field", default="caption", help="the field of .jsonl records holding the sentence")
    text.add_argument("--samples-per-shard", type=int, default=10000)
    args = parser.parse_args(argv)
    if args.kind == "captions":
        writer = write.captions_to_shards(
            args.annotations, args.media_root, args.out_dir, args.field, not args.eval, args.samples_per_shard
        )
    else:
        if len(args.paths) < 2:
            raise argparse.ArgumentError(None, "make-shards text: give at least one file and the output folder")
        writer = write.text_to_shards(args.paths[:-1], args.paths[-1], args.text_field, args.samples_per_shard)
    last = len(writer.shards) - 1
    print(f"{writer.count} samples in {len(writer.shards)} shards: {writer.out_dir}/{{00000..{last:05d}}}.tar")


def convert(argv: list[str]) -> None:
    """``vlgen convert hf-blip2 SRC_DIR OUT.ckpt`` or ``vlgen convert to-hf-blip2 CKPT OUT_DIR --config CONFIG``."""
    from vlgen.interop import convert as conversions

    parser = argparse.ArgumentParser(prog="vlgen convert", description=convert.__doc__, exit_on_error=False)
    directions = parser.add_subparsers(dest="direction", required=True)
    to_vlgen = directions.add_parser("hf-blip2", help="Hugging Face BLIP-2 directory -> vlgen checkpoint + config")
    to_vlgen.add_argument("src", help="a Blip2ForConditionalGeneration directory (save_pretrained layout)")
    to_vlgen.add_argument("out", help="the checkpoint to write; the config goes beside it with a .yaml suffix")
    to_vlgen.add_argument("--prompt", default="", help="text between the visual prompts and the caption")
    to_vlgen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_hf = directions.add_parser("to-hf-blip2", help="vlgen checkpoint -> Hugging Face BLIP-2 directory")
    to_hf.add_argument("ckpt", help="a vlgen checkpoint of a Captioner with a Q-Former")
    to_hf.add_argument("out_dir", help="the directory to write")
    to_hf.add_argument("--config", action="append", required=True, help="the model's config (repeatable)")
    args = parser.parse_args(argv)
    if args.direction == "hf-blip2":
        ckpt, config = conversions.from_hf_blip2(args.src, args.out, prompt=args.prompt, dtype=args.dtype)
        print(f"{ckpt}\n{config}")
    else:
        print(conversions.to_hf_blip2(args.ckpt, args.out_dir, args.config))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlgen`` command."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    try:
        if argv and argv[0] == "make-world":
            make_world(argv[1:])
            return
        if argv and argv[0] == "make-shards":
            make_shards(argv[1:])
            return
        if argv and argv[0] == "convert":
            convert(argv[1:])
            return
        if argv and argv[0] == "report":
            from vlgen.report import main as report

            report(argv[1:])
            return
        check_config_files(argv)
        VLGenCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=None if from_command_line else argv,
        )
    except argparse.ArgumentError as err:
        print(f"vlgen: error: {_first_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        cause = _config_cause(err)
        if cause is None:
            raise
        if isinstance(cause, ModuleNotFoundError):
            print(f"vlgen: error: a package is missing: {_first_line(str(cause))}", file=sys.stderr)
        else:
            print(f"vlgen: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


_GENERIC = ("Does not validate against", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value")


def _first_line(message: str) -> str:
    """jsonargparse's multi-line parse error squeezed into one line that keeps the specific reasons."""
    lines = [ln.strip().lstrip("- ").strip() for ln in message.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(_GENERIC)]
    return " ".join(lines) if lines else "invalid arguments"


def _config_cause(err: BaseException | None) -> BaseException | None:
    """The configuration error behind ``err`` (jsonargparse wraps errors raised while building components)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, RunStopped, FileNotFoundError)):
            return err
        if isinstance(err, ModuleNotFoundError) and not (err.name or "").startswith("vlgen"):
            return err  # a component the config names needs a package that is not installed (TensorBoard...)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
