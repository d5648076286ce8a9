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
* ``vlgen report RUN_DIR [--world ROOT]``: what a test run scored, a few captions, and on a synthetic world the
  share of captions that state the world's ground-truth facts (:mod:`vlgen.report`).

A configuration mistake (an unknown key, a path that does not exist) stops the run with one line naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlgen.errors import ConfigError

EXTRA_VERBS = ("make-world", "make-shards", "convert", "report")


class VLGenCLI(LightningCLI):
    """LightningCLI with vlgen's defaults: CSV logs under ``runs/``, a progress bar, seed 0."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "trainer.default_root_dir": "runs",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "vlgen"},
                },
            }
        )

    def after_instantiate_classes(self) -> None:
        """Give the model its ``model:`` config as resolved here, so that its checkpoints carry it (``vlgen.load``)."""
        import yaml

        from vlgen.artifacts import attach_config

        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        section = dumped.get(self.subcommand, dumped) if self.subcommand else dumped
        attach_config(self.model, section.get("model"))


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
        if isinstance(err, (ConfigError, FileNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
