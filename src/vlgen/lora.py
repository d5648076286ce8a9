"""LoRA adapters on a frozen module (a Hugging Face LLM, a timm encoder) through peft, chosen in YAML.

:class:`LoRA` is the ``lora:`` option of :class:`~vlgen.llms.CausalLM`, :class:`~vlgen.llms.Seq2SeqLM` and
:class:`~vlgen.encoders.TimmEncoder`. :func:`add_lora` wraps the chosen layers of the module in place with
``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper: the module keeps its class, ``generate``, ``config``,
``get_input_embeddings`` and forward signature) and leaves only the adapters trainable, so the frozen base weights stay
out of the optimiser and of vlgen's lean checkpoints, which then hold the adapters beside the bridge. The base weights
keep their names under each adapted layer (``q_proj.base_layer.weight``), so the frozen fingerprint of a rebuilt
model matches the saved one. Adapters are kept in float32 whatever the base's dtype, as peft's own ``get_peft_model``
does.

:func:`merged_state_dict` gives the state dict the module would have with its adapters merged into the base weights,
under the plain names (a ``save_pretrained`` of it is a model without peft layers); :func:`merge_lora` merges them in
place and puts the plain layers back.

peft is imported only when adapters are asked for (``pip install peft``); without it the option stops with one line.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vlgen.errors import ConfigError, load_failure

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter vlgen adds
_BASE = "base_layer"


@dataclass
class LoRA:
    """Low-rank adapters on the linear layers of a frozen model (``W x + (alpha / r) B A dropout(x)``).

    Args:
        r: rank of each adapter (``A`` is ``r x in``, ``B`` is ``out x r``; ``B`` starts at zero, so the adapted model
            starts as the base model).
        alpha: scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on each adapter's input in training (the frozen base's own dropout stays off).
        target_modules: the layers to adapt: ``all-linear`` (every linear layer but the output head: the LM's
            vocabulary projection, a timm model's classifier), a list of module names, each matching a module's full
            name or its last parts (``q_proj``, ``self_attn.v_proj``; timm ViTs call theirs ``qkv``, ``proj``,
            ``fc1``, ``fc2``; note that ``proj`` also names a ViT's patch-embedding convolution), or one regular
            expression that matches a full module name.
        bias: ``none`` keeps every bias frozen; ``lora_only`` trains the biases of the adapted layers; ``all`` trains
            every bias of the model (they are saved in checkpoints like the adapters).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"

    def check(self, option: str, frozen: bool = True) -> None:
        """Stop with one line naming ``option`` on a bad value, a base that is not frozen (adapters train beside a
        frozen base; without them the whole component fine-tunes) or a missing peft, before any weight is loaded."""
        part = option.split(".")[0]
        if not frozen:
            raise ConfigError(
                f"{option} trains adapters beside a frozen {part}: set {part}.frozen: true (or drop {option} to "
                f"fine-tune the whole {part})"
            )
        if self.r < 1:
            raise ConfigError(f"{option}.r must be 1 or more, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{option}.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{option}.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"{option}.bias must be none, all or lora_only, got {self.bias!r}")
        if not self.target_modules:
            raise ConfigError(f"{option}.target_modules is empty: name the layers to adapt, or all-linear")
        require_peft(option)


def require_peft(option: str) -> Any:
    """The ``peft`` module, or a one-line :class:`ConfigError` naming ``option`` and the package to install."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{option}: LoRA adapters need the peft package (pip install peft)") from None
    return peft


# --- adding adapters ------------------------------------------------------------------------------------------------
def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer with transposed weights)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The layer that maps features to outputs: a Hugging Face model's vocabulary projection, a timm classifier."""
    for getter in ("get_output_embeddings", "get_classifier"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                layer = fn()
            except (AttributeError, NotImplementedError):
                continue
            if isinstance(layer, nn.Module):
                return layer
    return None


def target_names(model: nn.Module, targets: list[str] | str, option: str, what: str) -> list[str]:
    """The full names of the modules of ``model`` that ``targets`` (:attr:`LoRA.target_modules`) picks.

    Raises:
        ConfigError: ``OPTION.target_modules: no layer of WHAT matches ...``, naming the model's linear layers.
    """
    modules = dict(model.named_modules())
    if targets == "all-linear":
        head = _output_layer(model)
        names = [n for n, m in modules.items() if _is_linear(m) and m is not head]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError(f"{option}.target_modules: {targets!r} is not a regular expression ({err})") from None
        names = [n for n in modules if n and pattern.fullmatch(n)]
    else:
        names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        linear = sorted({n.rpartition(".")[2] for n, m in modules.items() if _is_linear(m)})
        raise ConfigError(
            f"{option}.target_modules: no layer of {what} matches {targets!r} (its linear layers are called "
            f"{', '.join(linear) or 'nothing: it has none'})"
        )
    return names


def add_lora(model: nn.Module, lora: LoRA, option: str, what: str) -> int:
    """Freeze ``model`` (eval mode too) and wrap the layers ``lora`` picks with LoRA adapters, in place; only the
    adapters (and the biases ``lora.bias`` names) train.

    Args:
        model: the module to adapt (its class and attributes are kept).
        lora: the adapters' settings.
        option: the config option named in errors, e.g. ``"llm.lora"``.
        what: the model in the log line and errors, e.g. ``"llm data/shapes-tiny-lm"``.

    Returns:
        The number of adapter parameters.
    """
    lora.check(option)
    peft = require_peft(option)
    names = target_names(model, lora.target_modules, option, what)
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names, bias=lora.bias
    )
    model.requires_grad_(False)  # the base frozen, and in eval mode (its own dropout off), before the adapters go in
    model.eval()
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft switches fan_in_fan_out on itself and says so
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # a named layer of a kind LoRA cannot adapt
        raise ConfigError(f"{option}.target_modules: {load_failure(err)}") from None
    adapters = [p for _, p in adapter_parameters(model)]
    with torch.no_grad():
        for p in adapters:  # float32 adapters over a half-precision base, as peft's get_peft_model keeps them
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    count = sum(p.numel() for p in adapters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info(
        "%s: LoRA r=%d on %d layers: %s trainable parameters (%s in adapters), %s frozen",
        what, lora.r, len(names), f"{trainable:,}", f"{count:,}", f"{frozen:,}",
    )  # fmt: skip
    return count


# --- what is there --------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft adapter layers of ``model`` by full name (none when peft was never imported: nothing can be there)."""
    if sys.modules.get("peft") is None:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapters' own parameters (not their base layers'), with their full names in ``model``."""
    for name, layer in lora_layers(model).items():
        for sub, p in layer.named_parameters():
            if not sub.startswith(_BASE + "."):
                yield f"{name}.{sub}", p


def set_adapters_training(model: nn.Module, mode: bool) -> None:
    """Put the adapters (their dropout) in train or eval mode, whatever mode the base layers are in."""
    for layer in lora_layers(model).values():
        for name, child in layer.named_children():
            if name != _BASE:
                child.train(mode)


# --- merging --------------------------------------------------------------------------------------------------------
def _delta(layer: nn.Module) -> Tensor | None:
    """The weight update of ``layer``'s active adapters (None when they are merged already or there are none)."""
    if getattr(layer, "merged", False):
        return None
    total = None
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
            delta = layer.get_delta_weight(adapter)
            total = delta if total is None else total + delta
    return total


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict with every adapter merged into its base weight, under the names the model has
    without adapters (``q_proj.weight``, not ``q_proj.base_layer.weight``); ``model`` itself is not changed.

    A model without adapters gives its own state dict.
    """
    state = model.state_dict()
    layers = lora_layers(model)
    if not layers:
        return state
    deltas = {name: _delta(layer) for name, layer in layers.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if not rest.startswith(_BASE + "."):
            continue  # an adapter's own tensor
        rest = rest[len(_BASE) + 1 :]
        delta = deltas[owner]
        if rest == "weight" and delta is not None:  # summed in at least float32, stored in the base's dtype
            wide = torch.promote_types(value.dtype, torch.float32)
            value = (value.to(wide) + delta.to(wide)).to(value.dtype)
        out[f"{owner}.{rest}"] = value
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter of ``model`` into its base weight and put the plain layers back, in place.

    Returns:
        ``model``, now without peft layers: its state dict has the names and shapes of the model without adapters.
    """
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in vars(model):  # peft's record of the adapters it injected
        del model.peft_config
    return model
