"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and activation checkpointing for vlgen's LightningModules.

Lightning's ``ModelParallelStrategy`` gives the model a device mesh and leaves the sharding to the module's
``configure_model`` (:meth:`~vlgen.models.VLModule.configure_model` calls :func:`shard` here). The units:

* every **block** a component declares (:meth:`~vlgen.interfaces.HasBlocks.block_modules`: a ViT's or CNN's blocks, an
  LLM's decoder layers, the Q-Former's and the connector's BERT layers) is one FSDP unit, gathered for its own
  forward and backward and freed after each (``reshard_after_forward``): these hold nearly all of a large frozen
  model's weights;
* the **LightningModule itself** is the last unit: it holds everything outside the blocks (embeddings, norms,
  projections, heads, learned queries, a temperature), of every component and of the model's own layers. A
  LightningModule is not called: its step methods are, so they are registered as its forward methods
  (``register_fsdp_forward_method``) and these weights are gathered for the whole step, and kept gathered until
  the backward is done (``reshard_after_forward=False``; the backward needs them at once). Components need not
  route every use of their weights through ``forward`` (an LLM's ``loss`` reads its embedding table directly).

Gradients of every unit are averaged over the data-parallel ranks by the reduce-scatter, as DDP averages them, so a
sharded run trains what a DDP run trains. FSDP2 shards no scalar: scalar weights (a learned temperature, a
contextualizer's gate) stay whole on every rank, outside the units, and their gradients are averaged over the ranks
before each optimiser step (:func:`average_replicated_gradients`). Mixed precision stays the trainer's
(``precision: bf16-mixed`` is Lightning's autocast); weights are gathered in their own dtype.

Activation checkpointing (``model.activation_checkpointing``) uses torch's composable ``checkpoint`` on the same
blocks: hooks, no wrapper module, so parameter names (and lean checkpoints' keys) do not change; it works under any
strategy.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlgen.errors import ConfigError
from vlgen.interfaces import HasBlocks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")  # the root unit's forward methods


def component_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The blocks of each top-level component of ``model`` (``encoder``, ``bridge``, ``llm``, ``objectives`` ...), as
    the :class:`~vlgen.interfaces.HasBlocks` modules inside it declare them: each block once, none inside another."""
    out: dict[str, list[nn.Module]] = {}
    for name, child in model.named_children():
        found: dict[int, nn.Module] = {}
        for module in child.modules():
            if isinstance(module, HasBlocks):
                found.update((id(b), b) for b in module.block_modules())
        inner = {id(m) for b in found.values() for m in b.modules() if m is not b}
        out[name] = [b for i, b in found.items() if i not in inner]
    return out


def checkpoint_blocks(blocks: dict[str, list[nn.Module]], which: bool | list[str]) -> list[str]:
    """Activation-checkpoint the blocks of the components ``which`` names (``True``: all of them); returns the names
    of the components that got it. A name with no blocks stops here with one line."""
    if which is False or which == []:
        return []
    names = [n for n, b in blocks.items() if b] if which is True else list(which)
    unknown = [n for n in names if not blocks.get(n)]
    if unknown:
        have = ", ".join(n for n, b in blocks.items() if b) or "none"
        raise ConfigError(
            f"model.activation_checkpointing: {', '.join(unknown)} has no blocks to checkpoint (components with "
            f"blocks: {have})"
        )
    from torch.distributed._composable import checkpoint

    for name in names:
        for block in blocks[name]:
            checkpoint(block)  # non-reentrant, the RNG state replayed: the same dropout in the recomputation
    log.info("activation checkpointing: %s", ", ".join(f"{n} ({len(blocks[n])} blocks)" for n in names))
    return names


def shard(model: nn.Module, mesh: DeviceMesh, blocks: list[nn.Module]) -> None:
    """``fully_shard`` each of ``blocks`` (innermost first), then ``model`` itself as the root unit whose forward
    methods are its step methods (see the module)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = {id(m): n for n, m in model.named_modules()}
    scalars = {p for p in model.parameters() if p.ndim == 0}  # FSDP2 shards none: they stay whole on every rank
    for block in sorted(blocks, key=lambda b: -names[id(b)].count(".")):
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=scalars)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=scalars)
    # The root's own forward, run inside a step (a Captioner's self(pixels)), hooks its outputs for a pre-backward
    # gather; with these weights gathered until the backward ends that hook has nothing to do, so the warning that an
    # in-place op on a view output would drop it does not apply to the root.
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(model).__name__}\) returned a view")
    for method in STEP_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    held = sum(local(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "FSDP2: %d block units and the model's own over %d data-parallel ranks; this rank holds %s of %s weights",
        len(blocks), mesh.size(), f"{held:,}", f"{total:,}",
    )  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` has been sharded by :func:`shard` (its weights are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (a DTensor); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def average_replicated_gradients(model: nn.Module) -> None:
    """Average over the ranks the gradients of the trainable weights the units left whole (scalars; see the module),
    in one all-reduce: what DDP does for them. A weight without a gradient on any rank keeps none. Every rank must
    call this, after the backward."""
    params = [p for p in model.parameters() if p.requires_grad and not callable(getattr(p, "to_local", None))]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64, device=grads[0].device)
    flat = torch.cat([*(g.detach().reshape(-1).to(torch.float64) for g in grads), present])
    torch.distributed.all_reduce(flat)
    values, seen = flat[: -len(params)], flat[-len(params) :]
    world = torch.distributed.get_world_size()
    for p, g, part, any_grad in zip(params, grads, values.split([g.numel() for g in grads]), seen.tolist()):
        p.grad = (part / world).reshape(g.shape).to(g.dtype) if any_grad else None


def any_rank(flag: bool, device: Any) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
