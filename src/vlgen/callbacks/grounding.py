"""Is the LLM reading the image? A training-time monitor of how much the visual prompts help the frozen LLM.

A frozen LLM can learn to write fluent text that ignores its soft prompts: the loss falls on the captions' language
alone, and only a full evaluation shows the model describes no picture. :class:`GroundingMonitor` measures the
difference every ``every_n_steps`` optimiser steps, on the batch just trained (no extra data):

* ``train/grounding_gap``: the LM loss with the prompts of another sample of the batch (the batch rolled by one)
  minus the loss with each sample's own prompts. How many nats per target token the right picture is worth; near 0
  when the LLM does not read the prompts. (Samples of one picture, e.g. several questions about it, shrink it.)
* ``train/grounding_gap_zero``: the loss with all-zero prompts minus the loss with the own prompts.
* ``train/prompt_norm_ratio``: the mean norm of the real prompts over the mean norm of the LLM's token embeddings
  (prompts far off the scale of the LLM's own inputs are a common reason it ignores them).
* ``train/prompt_attention``: for a decoder-only Hugging Face LLM, the share of attention the text positions pay to
  the prompt positions (mean over layers, heads and positions), read with eager attention for that one pass.

All four are computed in eval mode (no dropout), without gradients, with the random generators' states put back,
so training, its checkpoints and an exact resume are the same with or without the monitor. When the gap stays
below ``min_gap`` for ``patience`` checks after ``warmup_steps``, one warning line says so and names what to try.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from vlgen import sharding
from vlgen.dist import gather_objects
from vlgen.errors import ConfigError
from vlgen.interfaces import BridgeOutput

log = logging.getLogger(__name__)

ADVICE = (
    "try a higher learning rate for the bridge, a prompt or chat turn that refers to the image "
    "(llm.init_args.chat_template), prompts on the scale of the LLM's embeddings (train/prompt_norm_ratio), "
    "or more steps before judging"
)


class GroundingMonitor(Callback):
    """Log how much the batch's own visual prompts lower the frozen LLM's loss (see the module).

    Args:
        every_n_steps: optimiser steps between two measurements (each costs about one training step's forward
            passes: three LM forwards without gradients).
        warmup_steps: steps before the gap is judged.
        min_gap: the gap (nats per target token) under which the LLM is said not to read the prompts.
        patience: consecutive measurements under ``min_gap`` before the warning.
        attention: also measure the attention mass on the prompts (decoder-only Hugging Face LLMs).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        warmup_steps: int = 200,
        min_gap: float = 0.02,
        patience: int = 3,
        attention: bool = True,
    ) -> None:
        if every_n_steps < 1 or warmup_steps < 0 or patience < 1:
            raise ConfigError(
                f"GroundingMonitor: every_n_steps and patience must be >= 1 and warmup_steps >= 0, got "
                f"{every_n_steps}, {patience} and {warmup_steps}"
            )
        self.every_n_steps, self.warmup_steps = every_n_steps, warmup_steps
        self.min_gap, self.patience, self.attention = min_gap, patience, attention
        self.low = 0  # consecutive measurements under min_gap after warm-up
        self.warned = False
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, figures): what was logged, for inspection
        self.seconds = 0.0  # spent measuring
        self._fit_start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = time.perf_counter() - self._fit_start
        if self.history and total > 0:
            log.info(
                "grounding monitor: %d checks, %.1f s, %.1f%% of the training time",
                len(self.history), self.seconds, 100 * self.seconds / total,
            )  # fmt: skip

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimiser steps done, this batch's included
        if step % self.every_n_steps or not hasattr(pl_module, "lm_loss") or not isinstance(batch, dict):
            return
        usable = bool(batch.get("captions"))  # False: every sample of the batch was unreadable
        if sharding.is_sharded(pl_module):  # the passes below gather sharded weights: all ranks run them, or none
            usable = all(gather_objects([usable]))
        if not usable:
            return
        start = time.perf_counter()
        figures = grounding_figures(pl_module, batch, attention=self.attention)
        self.seconds += time.perf_counter() - start
        self.history.append((step, figures))
        finite = {f"train/{k}": v for k, v in figures.items() if math.isfinite(v)}
        for logger in trainer.loggers if finite else ():  # straight to them: not only on log_every_n_steps steps
            logger.log_metrics(finite, step=step)
        self._judge(step, figures.get("grounding_gap", math.nan))

    def _judge(self, step: int, gap: float) -> None:
        if step < self.warmup_steps or not math.isfinite(gap):
            return
        self.low = self.low + 1 if gap < self.min_gap else 0
        if self.low >= self.patience and not self.warned:
            self.warned = True
            log.warning(
                "grounding: at step %d the LM loss with another image's prompts is only %.4f nats above the loss "
                "with the image's own (%d checks in a row under %.3g): the LLM is not reading the image; %s",
                step, gap, self.low, self.min_gap, ADVICE,
            )  # fmt: skip


@torch.no_grad()
def grounding_figures(module: Any, batch: dict[str, Any], attention: bool = True) -> dict[str, float]:
    """The monitor's figures for one batch (see the module): ``grounding_gap``, ``grounding_gap_zero``,
    ``prompt_norm_ratio`` and, where it can be read, ``prompt_attention``. ``module`` is a
    :class:`~vlgen.models.Captioner` (or anything with its ``forward``, ``prefixes``, ``lm_loss`` and ``llm``)."""
    devices = [module.device] if getattr(module, "device", torch.device("cpu")).type == "cuda" else []
    was_training = module.training
    with torch.random.fork_rng(devices=devices):
        module.eval()
        try:
            out = module(batch["pixels"], batch.get("prompts"))
            prefixes = module.prefixes(len(batch["captions"]), batch.get("prompts"))
            with attention_probe(module.llm, out.prompts if attention else None) as probe:
                own = module.lm_loss(out, prefixes, batch)
            zero = module.lm_loss(replace(out, prompts=torch.zeros_like(out.prompts)), prefixes, batch)
            figures = {"grounding_gap_zero": float(zero - own), "prompt_norm_ratio": prompt_norm_ratio(module, out)}
            figures["grounding_gap"] = math.nan
            if len(out.prompts) > 1:
                rolled = BridgeOutput(out.prompts.roll(1, dims=0), None if out.mask is None else out.mask.roll(1, 0))
                figures["grounding_gap"] = float(module.lm_loss(rolled, prefixes, batch) - own)
            if probe.mass is not None:
                figures["prompt_attention"] = probe.mass
        finally:
            module.train(was_training)
    return figures


def prompt_norm_ratio(module: Any, out: BridgeOutput) -> float:
    """Mean L2 norm of the real prompts over the mean L2 norm of the LLM's input-embedding rows (NaN if unknown)."""
    table = _input_embeddings(module.llm)
    if table is None:
        return math.nan
    norms = out.prompts.float().norm(dim=-1)  # [B, M]
    if out.mask is not None:
        norms = norms[out.mask.bool()]
    return float(norms.mean() / table.weight.float().norm(dim=-1).mean())


def _input_embeddings(llm: nn.Module) -> nn.Embedding | None:
    model = getattr(llm, "model", None)
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    return table if isinstance(table, nn.Embedding) else None


class _Probe:
    mass: float | None = None


@contextmanager
def attention_probe(llm: nn.Module, prompts: Tensor | None) -> Iterator[_Probe]:
    """While active, the decoder-only HF model inside ``llm`` returns its attentions (eager attention for the pass)
    and ``probe.mass`` becomes the mean attention that positions after the prompts pay to the prompt positions.

    The prompt positions are found by value: the rows of the model's ``inputs_embeds`` equal to one of ``prompts``
    (the LLM copies them in, after any chat or BOS head). Nothing is measured for encoder-decoder LLMs, models
    without ``output_attentions``, or when ``prompts`` is None.
    """
    probe = _Probe()
    model = getattr(llm, "model", None)
    config = getattr(model, "config", None)
    if prompts is None or not isinstance(model, nn.Module) or config is None or config.is_encoder_decoder:
        yield probe
        return
    seen: dict[str, Tensor] = {}

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("inputs_embeds") is not None:
            seen["embeds"] = kwargs["inputs_embeds"]
            seen["mask"] = kwargs.get("attention_mask")
            kwargs = {**kwargs, "output_attentions": True}
        return args, kwargs

    def after(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
        attentions = getattr(output, "attentions", None)
        if attentions and "embeds" in seen and all(a is not None for a in attentions):
            probe.mass = _prompt_mass(attentions, seen["embeds"], seen["mask"], prompts)

    implementation = getattr(config, "_attn_implementation", None)
    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        if implementation not in (None, "eager"):
            config._attn_implementation = "eager"  # sdpa / flash attention return no weights
        yield probe
    finally:
        for hook in hooks:
            hook.remove()
        if implementation not in (None, "eager"):
            config._attn_implementation = implementation


def _prompt_mass(attentions: tuple[Tensor, ...], embeds: Tensor, mask: Tensor | None, prompts: Tensor) -> float:
    """Mean over layers, heads and the real positions after the last prompt of the attention paid to prompts.

    With a key-value cache of a constant head (:class:`~vlgen.llms.CausalLM` reads a chat opening once), ``embeds``
    holds the positions after it and the mask and the attention keys cover the head too."""
    flat = prompts.reshape(-1, prompts.shape[-1]).to(embeds.dtype)  # [B*M, D]
    is_prompt = (embeds.unsqueeze(2) == flat.view(1, 1, *flat.shape)).all(-1).any(-1)  # [B, L]
    cached = 0 if mask is None else mask.shape[1] - embeds.shape[1]  # positions in the cache, before embeds
    real = torch.ones_like(is_prompt) if mask is None else mask[:, cached:].bool()
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    last = torch.where(is_prompt, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
    queries = real & (positions > last) & (last >= 0)  # [B, L]
    if not queries.any():
        return math.nan
    keys = torch.cat([is_prompt.new_zeros(len(is_prompt), cached), is_prompt], dim=1)  # [B, cached + L]
    stacked = torch.stack([a.float() for a in attentions])  # [layers, B, heads, L, cached + L]
    on_prompts = (stacked * keys[None, :, None, None, :]).sum(-1).mean(dim=(0, 2))  # [B, L]
    return float(on_prompts[queries].mean())
