"""Distributed helpers every layer may use: rank lookup, object gathers for metrics and prediction files, and
tensor gathers (with and without gradients) for contrastive losses over the global batch.

Everything here is an identity in a single process, so a component written against these helpers runs unchanged
with one device or many. This module sits below encoders, bridges, objectives and models: it imports nothing of
vlgen's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate ``items`` from every rank (rank order); a no-op outside distributed runs."""
    if world_size() == 1:
        return list(items)
    parts: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in (part or [])]


def broadcast_from_zero(obj: Any) -> Any:
    """Rank zero's ``obj`` on every rank (a no-op outside distributed runs)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's slice (all-reduce, then slice).

    ``torch.distributed.nn.functional.all_gather``, whose gloo backward is an emulated all-to-all, gave wrong
    gradients for a contrastive loss in a two-rank CPU test (torch 2.14); this is exact.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        size = grad.shape[0] // world_size()
        return grad[rank() * size : (rank() + 1) * size]


def gather_with_grad(x: Tensor) -> Tensor:
    """``[B, ...]`` from every rank -> ``[M, ...]`` (rank order); gradients flow back to each rank's part."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """``[B, ...]`` from every rank -> ``[M, ...]`` without gradients (token ids, masks)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
