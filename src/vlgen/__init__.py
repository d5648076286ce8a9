"""vlgen: language generation from images and video with a frozen LLM, components swapped in YAML."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlgen.artifacts import load

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # ``vlgen.load`` imports torch and, when called, Lightning: only on first use, so ``import vlgen`` stays light.
    if name == "load":
        from vlgen.artifacts import load

        return load
    raise AttributeError(f"module 'vlgen' has no attribute {name!r}")
