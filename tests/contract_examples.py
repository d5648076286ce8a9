"""One tiny constructor example per exported component class, for tests/test_contracts.py.

This table is the only per-class knowledge the contract tests have: every class exported from ``vlgen.encoders``,
``vlgen.encoders.temporal``, ``vlgen.bridges`` and ``vlgen.llms`` that is a concrete ``VisualEncoder``,
``TemporalModule``, ``Bridge`` or ``LanguageModel`` must have an entry here (a test fails naming any that lacks one).
Each factory gets a :class:`Fixtures` (temp dirs and the session fixtures of tests/conftest.py) and returns the
smallest real instance, built as users build it. Conventions the tests rely on:

- a bridge is returned *unbuilt*: the tests call ``build(vision_dim, llm_dim)`` with their own small widths;
- a temporal module is returned unattached: the tests host it in a ``FrameEncoder`` over :func:`frame_image`;
- a factory may be called several times per test (fresh twins for the state-dict round trip), so it must not
  depend on state left by an earlier call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers
from torch import nn

from vlgen.bridges import LinearProjector, MLPProjector, QFormer, TokenMergingConnector
from vlgen.encoders import (
    ConcatFrames,
    FrameEncoder,
    HFBlip2Vision,
    MeanOverTime,
    MiddleFrame,
    TemporalContextualizer,
    TimmEncoder,
)
from vlgen.llms import CausalLM, Decoding, Seq2SeqLM


class Fixtures:
    """What a factory may use: ``tmp(name)`` for a fresh temp dir, ``get(name)`` for a pytest fixture by name."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request

    def get(self, name: str) -> Any:
        return self._request.getfixturevalue(name)

    def tmp(self, name: str) -> Path:
        return self.get("tmp_path_factory").mktemp(name)

    def cached_dir(self, name: str, write: Callable[[Path], None]) -> Path:
        """A temp dir written once per session by ``write`` (model files several factories' calls share)."""
        cache = self._request.config.stash.setdefault(_DIRS, {})
        if name not in cache:
            out = self.tmp(name)
            write(out)
            cache[name] = out
        return cache[name]


_DIRS = pytest.StashKey[dict]()
Factory = Callable[[Fixtures], nn.Module]


def frame_image(fx: Fixtures) -> TimmEncoder:
    """The frozen per-frame encoder of every ``FrameEncoder`` the contract tests build: timm's ``test_vit`` at 32 px,
    two blocks (``[B, 1 + 4, 64]`` tokens)."""
    return TimmEncoder("test_vit", model_kwargs={"img_size": 32, "depth": 2}, init_seed=0)


def _blip2_vision_dir(out: Path) -> None:
    """A random 2-layer ``Blip2VisionModel`` at 32 px (BLIP-2's own initializer_range of 1e-10 would make every
    token ~0, so the usual 0.02)."""
    config = transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        initializer_range=0.02,
    )  # fmt: skip
    transformers.Blip2VisionModel(config).save_pretrained(out)


EXAMPLES: dict[type, Factory] = {
    # --- encoders (vlgen.encoders) ---------------------------------------------------------------------------------
    TimmEncoder: lambda fx: TimmEncoder("test_resnet", init_seed=0, transform={"input_size": (3, 64, 64)}),
    HFBlip2Vision: lambda fx: HFBlip2Vision(str(fx.cached_dir("blip2-vision", _blip2_vision_dir))),
    FrameEncoder: lambda fx: FrameEncoder(frame_image(fx)),
    # --- temporal modules (vlgen.encoders.temporal), hosted by FrameEncoder(frame_image(fx), module) ----------------
    MeanOverTime: lambda fx: MeanOverTime(),
    MiddleFrame: lambda fx: MiddleFrame(),
    ConcatFrames: lambda fx: ConcatFrames(max_frames=4),
    TemporalContextualizer: lambda fx: TemporalContextualizer(hidden_dim=16, num_heads=2),
    # --- bridges (vlgen.bridges), unbuilt ----------------------------------------------------------------------------
    LinearProjector: lambda fx: LinearProjector(),
    MLPProjector: lambda fx: MLPProjector(num_layers=2, hidden_dim=16),
    QFormer: lambda fx: QFormer(str(fx.get("tiny_bert_dir")), num_queries=4, frozen=True),
    TokenMergingConnector: lambda fx: TokenMergingConnector(num_layers=2, r=2, hidden_size=32, num_heads=2),
    # --- language models (vlgen.llms) ---------------------------------------------------------------------------------
    CausalLM: lambda fx: CausalLM(str(fx.get("tiny_llm_dir")), decoding=Decoding(max_new_tokens=3)),
    Seq2SeqLM: lambda fx: Seq2SeqLM(str(fx.get("tiny_t5_dir")), decoding=Decoding(max_new_tokens=3)),
}
