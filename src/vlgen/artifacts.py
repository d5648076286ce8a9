"""Self-describing artifacts: checkpoints and ``save_pretrained`` directories that rebuild their model alone.

A vlgen checkpoint is lean (the trainable weights; frozen parts are rebuilt from the config), so it needs the config
that built it. Every checkpoint a :class:`~vlgen.models.base.VLModule` saves therefore carries, under
``checkpoint["vlgen"]``:

* ``model_config``: the ``model:`` section (``class_path`` + ``init_args``) as the CLI resolved it, when known;
* ``frozen_fingerprint``: a cheap fingerprint of the frozen parameters per top-level component (``llm``,
  ``encoder`` ...), so that loading against other frozen weights logs one warning line naming them.

:func:`load` (``vlgen.load``) builds the model of a ``save_pretrained`` directory, a run directory or a ``.ckpt``
file through jsonargparse, as ``vlgen fit`` does, and loads the trainable weights into it.

The fingerprint hashes each frozen tensor's name, shape and dtype and a fixed strided sample of its values
(:data:`SAMPLES` values per tensor, read in one transfer per component), so it costs milliseconds even for a 7B LLM;
it is cached on the module until a frozen tensor is replaced, moved, cast or changed in place. A model about to be
sharded (FSDP2) pins its fingerprint first (:func:`pin_frozen_fingerprint`): each rank then holds a shard of every
frozen tensor, and the pinned value of the whole ones stands for them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from vlgen.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule
    from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "vlgen"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
SAMPLES = 256  # values read from each frozen tensor
FINGERPRINT_SCHEME = f"name-shape-dtype-strided{SAMPLES}-sha256"
_CONFIG_ATTR = "_vlgen_model_config"
_CACHE_ATTR = "_vlgen_frozen_fingerprint"
_PINNED_ATTR = "_vlgen_frozen_fingerprint_pinned"


# --- the model config -----------------------------------------------------------------------------------------------
def attach_config(module: nn.Module, config: dict[str, Any] | None) -> None:
    """Remember the ``model:`` config (``class_path`` + ``init_args``) that built ``module``; checkpoints carry it."""
    setattr(module, _CONFIG_ATTR, None if config is None else copy.deepcopy(config))


def model_config(module: nn.Module) -> dict[str, Any] | None:
    """The config :func:`attach_config` gave ``module`` (the CLI and :func:`load` do), or None."""
    return getattr(module, _CONFIG_ATTR, None)


def model_section(config: Any, source: str) -> dict[str, Any]:
    """The ``class_path`` + ``init_args`` mapping of ``config``: that mapping itself, a whole vlgen config (its
    ``model:`` section) or a YAML file holding either."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{source}: config {path} does not exist")
        config = _read_yaml(path, source)
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        config = config["model"]
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise ConfigError(f"{source}: the model config needs a class_path (a model: section or class_path/init_args)")
    return copy.deepcopy(config)


def _read_yaml(path: Path, source: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{source}: cannot read {path}: {str(err).splitlines()[0]}") from None


# --- the frozen-parts fingerprint -----------------------------------------------------------------------------------
def frozen_fingerprint(module: nn.Module) -> dict[str, str]:
    """A short hash of the frozen parameters of each top-level component of ``module`` that has any (the pinned one
    once :func:`pin_frozen_fingerprint` has run)."""
    pinned = getattr(module, _PINNED_ATTR, None)
    if pinned is not None:
        return dict(pinned)
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad]
    key = tuple((n, _pointer(p), getattr(p, "_version", 0), p.dtype, tuple(p.shape), p.device) for n, p in frozen)
    cached = getattr(module, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in frozen:
        groups.setdefault(name.split(".", 1)[0], []).append((name, p))
    fingerprint = {component: _hash(tensors) for component, tensors in groups.items()}
    setattr(module, _CACHE_ATTR, (key, fingerprint))
    return dict(fingerprint)


def pin_frozen_fingerprint(module: nn.Module) -> dict[str, str]:
    """Fix ``module``'s fingerprint at its present frozen weights, for good: call it before sharding them, which
    leaves each rank a shard (frozen weights do not change, so the fingerprint of the whole ones stays true)."""
    setattr(module, _PINNED_ATTR, None)
    fingerprint = frozen_fingerprint(module)
    setattr(module, _PINNED_ATTR, fingerprint)
    return dict(fingerprint)


def _pointer(t: torch.Tensor) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # tensors without storage (meta, some wrappers)
        return 0


def _hash(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    samples = []
    for name, t in tensors:
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        sample = _sample(t)
        if sample is not None:
            samples.append(sample)
    if samples:
        device = samples[0].device
        values = torch.cat([s.to(device) for s in samples]).cpu()  # one transfer per component
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _sample(t: torch.Tensor) -> torch.Tensor | None:
    """:data:`SAMPLES` evenly strided values of ``t`` as raw bytes (any dtype, bfloat16 included), or None."""
    if t.is_meta or t.numel() == 0:
        return None
    try:
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES)
        return flat[::stride][:SAMPLES].contiguous().view(torch.uint8)
    except (RuntimeError, TypeError):  # dtypes without a byte view (quantised tensors): name, shape, dtype only
        return None


def describe_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Record in ``checkpoint`` what rebuilds ``module``: its model config (when known) and frozen fingerprint."""
    from vlgen import __version__

    info: dict[str, Any] = {
        "version": __version__,
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "frozen_fingerprint": frozen_fingerprint(module),
    }
    config = model_config(module)
    if config is not None:
        info["model_config"] = copy.deepcopy(config)
    checkpoint[CHECKPOINT_KEY] = info


def check_frozen(module: nn.Module, checkpoint: dict[str, Any], source: str | None = None) -> list[str]:
    """Log one warning line when ``module``'s frozen parts differ from those ``checkpoint`` was saved with.

    Returns:
        The components that differ (none for a checkpoint saved before vlgen recorded fingerprints).
    """
    info = checkpoint.get(CHECKPOINT_KEY) or {}
    if source is None:
        path = getattr(getattr(module, "_trainer", None), "ckpt_path", None)
        source = f"checkpoint {path}" if path else "checkpoint"
    return _compare(module, info.get("frozen_fingerprint"), info.get("fingerprint_scheme"), source)


def _compare(module: nn.Module, saved: dict[str, str] | None, scheme: str | None, source: str) -> list[str]:
    if saved is None or scheme != FINGERPRINT_SCHEME:
        return []
    current = frozen_fingerprint(module)
    # Components frozen on one side only are left out: frozen now but trained then, the checkpoint holds their
    # weights; trained now but frozen then, the load already stops on their missing weights.
    differ = sorted(k for k in saved.keys() & current.keys() if saved[k] != current[k])
    if differ and _rank_zero():
        log.warning(
            "%s: the frozen weights of %s differ from the ones its trainable weights were trained against; "
            "outputs may not be the saved model's",
            source, ", ".join(differ),
        )  # fmt: skip
    return differ


def _rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# --- save_pretrained ------------------------------------------------------------------------------------------------
def save_pretrained(module: nn.Module, directory: str | os.PathLike, config: Any = None) -> Path:
    """Write ``directory/config.yaml`` (the ``model:`` config) and ``directory/model.safetensors`` (the weights a
    checkpoint keeps, with the frozen fingerprint in its metadata); :func:`load` reads them back.

    Args:
        module: a :class:`~vlgen.models.base.VLModule`.
        directory: created if needed; the two files are overwritten.
        config: the model config (``class_path`` + ``init_args``, a whole vlgen config, or a YAML file); by default
            the one the CLI or :func:`load` attached to the module.
    """
    from safetensors.torch import save_file

    source = f"save_pretrained {directory}"
    if config is None:
        config = model_config(module)
        if config is None:
            raise ConfigError(
                f"save_pretrained: no model config is known for this {type(module).__name__} (it was not built by "
                "the vlgen CLI or vlgen.load): pass config={'class_path': ..., 'init_args': ...} or a YAML file"
            )
    config = model_section(config, source)
    _check_class(module, config["class_path"], source)
    try:
        text = yaml.safe_dump({"model": config}, sort_keys=False)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: the model config is not plain YAML data: {str(err).splitlines()[0]}") from None
    keep = module._trainable_keys()
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items() if k in keep}
    fingerprint = {"scheme": FINGERPRINT_SCHEME, "components": frozen_fingerprint(module)}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# The model of vlgen.load({str(out)!r}); its trainable weights are in {WEIGHTS_FILE}.\n"
    (out / CONFIG_FILE).write_text(header + text)
    metadata = {"format": "pt", "vlgen_frozen_fingerprint": json.dumps(fingerprint)}
    save_file(weights, str(out / WEIGHTS_FILE), metadata=metadata)
    log.info("save_pretrained: %d tensors and the model config in %s", len(weights), out)
    return out


def _check_class(module: nn.Module, class_path: str, source: str) -> None:
    """A config naming another class than ``module``'s would not rebuild it: stop before writing anything."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:  # a bare class name, resolved by jsonargparse at load time
        return
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{source}: the config's class_path {class_path} does not import") from None
    if cls is not type(module):
        raise ConfigError(f"{source}: the config builds a {class_path}, not this {type(module).__qualname__}")


# --- load -----------------------------------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> LightningModule:
    """The model saved at ``path``, built from its config with its weights, in eval mode (on the CPU).

    ``path`` is a directory :meth:`~vlgen.models.base.VLModule.save_pretrained` wrote (``config.yaml`` +
    ``model.safetensors``), a run directory (``checkpoints/last.ckpt``, with ``config.yaml`` for checkpoints older
    than the config they carry) or a checkpoint file. The frozen parts are rebuilt from the config; when they differ
    from the ones the weights were saved with, one warning line names them.

    Raises:
        ConfigError: one line naming ``path``: it is none of these, its config does not build, or a trainable weight
            is missing or has another shape.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"vlgen.load: {path} does not exist")
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
            return _load_pretrained(path)
        ckpt = _run_checkpoint(path)
        if ckpt is None:
            raise ConfigError(
                f"vlgen.load: {path} is neither a save_pretrained directory ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
                "run directory (checkpoints/last.ckpt)"
            )
        path = ckpt
    return _load_checkpoint(path)


def _run_checkpoint(run: Path) -> Path | None:
    folder = run / "checkpoints"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if len(found) > 1:
        raise ConfigError(f"vlgen.load: {run} holds {len(found)} checkpoints and no last.ckpt: name one of them")
    return found[0] if found else None


def _load_pretrained(directory: Path) -> LightningModule:
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = f"vlgen.load: {directory}"
    model = build_model(model_section(directory / CONFIG_FILE, source), source)
    weights_file = directory / WEIGHTS_FILE
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights_file))
        fingerprint = json.loads(metadata.get("vlgen_frozen_fingerprint", "null")) or {}
    except (OSError, ValueError, RuntimeError) as err:  # safetensors reports a damaged file as a ValueError-like
        raise ConfigError(f"{source}: cannot read {weights_file}: {str(err).splitlines()[0]}") from None
    _load_weights(model, state, source)
    _compare(model, fingerprint.get("components"), fingerprint.get("scheme"), str(directory))
    return model.eval()


def _load_checkpoint(path: Path) -> LightningModule:
    from vlgen.loading import read_checkpoint

    source = f"vlgen.load: {path}"
    checkpoint = read_checkpoint(path, "vlgen.load")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{source} is not a vlgen checkpoint (it has no state_dict)")
    info = checkpoint.get(CHECKPOINT_KEY) or {}
    config = info.get("model_config") or _config_beside(path, source)
    model = build_model(model_section(config, source), source)
    _load_weights(model, checkpoint["state_dict"], source)
    check_frozen(model, checkpoint, str(path))
    return model.eval()


def _config_beside(ckpt: Path, source: str) -> dict[str, Any]:
    """The model config of a checkpoint that does not carry one: ``NAME.yaml`` beside ``NAME.ckpt`` (what ``vlgen
    convert`` writes), or the run's ``config.yaml`` beside the checkpoint or one folder above it."""
    for candidate in (ckpt.with_suffix(".yaml"), ckpt.parent / CONFIG_FILE, ckpt.parent.parent / CONFIG_FILE):
        if candidate != ckpt and candidate.is_file():
            data = _read_yaml(candidate, source)
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                log.info("%s carries no model config; using the model: of %s", ckpt, candidate)
                return data["model"]
    raise ConfigError(
        f"{source} carries no model config (saved before vlgen recorded it) and no {CONFIG_FILE} with a model: "
        "section lies beside or above it"
    )


def build_model(config: dict[str, Any], source: str = "vlgen.load") -> LightningModule:
    """Instantiate a ``class_path`` + ``init_args`` model config through jsonargparse, as the ``vlgen`` CLI does."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningArgumentParser

    from vlgen.cli import _config_cause, _first_line  # the CLI's one-line rendering of jsonargparse's errors

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True, required=True)
    try:
        model = parser.instantiate_classes(parser.parse_object({"model": config})).model
    except argparse.ArgumentError as err:
        raise ConfigError(f"{source}: its model config does not parse: {_first_line(str(err))}") from None
    except Exception as err:
        cause = _config_cause(err)
        if cause is None:
            raise
        raise ConfigError(f"{source}: {cause}") from None
    attach_config(model, config)
    return model


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the saved trainable weights after checking that every one of them is there, with its shape."""
    own = model.state_dict()
    if hasattr(model, "_trainable_keys"):  # a VLModule: exactly what its checkpoints and save_pretrained keep
        keep = model._trainable_keys()
        expected = [k for k in own if k in keep]
    else:
        expected = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} trainable weights of this model, e.g. {missing[:3]}")
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ConfigError(f"{source}: {key} is {tuple(value.shape)} there, {tuple(own[key].shape)} in the model")
    unused = sorted(k for k in state if k not in own)
    if unused:
        log.warning(
            "%s: %d saved tensors are not this model's and were ignored, e.g. %s", source, len(unused), unused[:3]
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
