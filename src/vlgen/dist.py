"""Collecting Python objects (strings, dicts) from every rank, for metrics and prediction files."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate ``items`` from every rank (rank order); a no-op outside distributed runs."""
    if world_size() == 1:
        return list(items)
    parts: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in (part or [])]


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def broadcast_from_zero(obj: Any) -> Any:
    """Rank zero's ``obj`` on every rank (a no-op outside distributed runs)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
