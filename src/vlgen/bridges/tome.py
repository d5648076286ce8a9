"""Token merging (ToMe, Bolya et al., arXiv 2210.09461): bipartite soft matching as pure torch functions.

One step splits the tokens alternately into set A (even positions) and set B (odd positions), finds every A token's
most similar B token (cosine of ``metric``) and merges the ``r`` best-matched A tokens into their partners with a
size-weighted average, so N tokens become N - r; ``size`` counts the input tokens each output stands for.

Output order: the kept A tokens in their original relative order, then every B token in its original order. With
``protect_first`` token 0 is never merged and therefore stays first.

Padding (``mask [B, N]``, true = real token, padding anywhere): each sample's real tokens are first moved ahead of its
padding (stable), so they get the A/B split they would get alone. Real A tokens only match real B tokens, and a sample
merges at most ``(n_real - protected) // 2`` of them, its best ones (the cap it would have alone). Merges beyond that
take padded A tokens, and only when none are left move real A tokens unchanged into padded B slots. Padded tokens have
size 0 and zeroed values, so they never change a real value. Output slots are ordered as the sample alone would order
them (kept A, then B, by position), slots holding only padding last. Hence a padded sample's outputs are exactly its
unpadded result (r capped as it would be alone) followed by padding slots, whatever the batch's r.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

Reduce = Literal["sum", "mean", "amax", "amin"]
RSchedule = int | Sequence[int] | tuple[int, float] | str

# Cosine scores lie in [-1, 1]: these ranks sort A tokens that merge for bookkeeping only after every real match,
# and padded ones before real ones, so real tokens are the last to be moved.
_PADDED_A = -3.0
_OVERFLOW_A = -5.0


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Gather rows: `x [B, N, C]`, `idx [B, M]` -> `[B, M, C]`."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class MergePlan:
    """One merge step, computed once by `bipartite_soft_matching` and applicable to any tensor `[B, N, *]`.

    Attributes:
        r: tokens removed; 0 makes the plan the identity.
        keep_idx: `[B, NA - r]` kept positions within set A, ascending.
        src_idx: `[B, r]` merged positions within set A.
        dst_idx: `[B, r]` their partners' positions within set B.
        order: `[B, N]` real-first reordering applied before the split (None without a mask).
        out_order: `[B, N - r]` final reordering: unpadded order, padding slots last (None without a mask).
        mask: `[B, N - r]` bool, true where a slot holds a real token (None without a mask; the input mask when r=0).
    """

    r: int
    keep_idx: Tensor | None = None
    src_idx: Tensor | None = None
    dst_idx: Tensor | None = None
    order: Tensor | None = None
    out_order: Tensor | None = None
    mask: Tensor | None = None

    def __call__(self, x: Tensor, reduce: Reduce = "sum") -> Tensor:
        """Merge `x [B, N, *]` (or `[B, N]`) into `[B, N - r, *]`, reducing each group with `reduce`.

        A group is a B token plus the A tokens merged into it. "mean" is unweighted; use `merge_tokens` for the
        size-weighted average (under a mask it is the one that ignores padding).
        """
        if reduce not in ("sum", "mean", "amax", "amin"):
            raise ValueError(f"reduce must be 'sum', 'mean', 'amax' or 'amin', got {reduce!r}")
        if self.r <= 0:
            return x
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1)
        if self.order is not None:
            x = _take(x, self.order)
        a, b = x[:, ::2], x[:, 1::2]
        idx = self.dst_idx[..., None].expand(-1, -1, x.shape[-1])
        b = b.scatter_reduce(1, idx, _take(a, self.src_idx), reduce=reduce)
        out = torch.cat([_take(a, self.keep_idx), b], dim=1)
        if self.out_order is not None:
            out = _take(out, self.out_order)
        return out.reshape(shape[0], out.shape[1], *shape[2:])


def bipartite_soft_matching(
    metric: Tensor, r: int, protect_first: bool = True, mask: Tensor | None = None
) -> MergePlan:
    """Plan one ToMe step from `metric [B, N, K]` removing `r` tokens (capped at `(N - protect_first) // 2`).

    `mask [B, N]` marks real tokens (see the module docstring for padding); with protect_first and a mask the
    protected token is each sample's first real token.
    """
    n = metric.shape[1]
    protected = int(protect_first)
    r = min(r, (n - protected) // 2)
    real = None if mask is None else mask.to(device=metric.device, dtype=torch.bool)
    if r <= 0:
        return MergePlan(r=0, mask=real)

    with torch.no_grad():
        order = None
        if real is not None:
            order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
            metric, real_c = _take(metric, order), real.gather(1, order)
        metric = F.normalize(metric, dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, NA, NB]
        if real is not None:
            real_a, real_b = real_c[:, ::2], real_c[:, 1::2]
            scores = scores.masked_fill(~real_b[:, None, :], -math.inf)
        if protect_first:
            scores[:, 0] = -math.inf
        best, partner = scores.max(dim=-1)  # [B, NA]

        if real is not None:
            matchable = real_a & torch.isfinite(best)
            best = best.masked_fill(~matchable, -math.inf)
            by_score = torch.sort(best, dim=1, descending=True, stable=True).indices
            positions = torch.arange(best.shape[1], device=best.device).expand_as(by_score)
            rank = torch.empty_like(by_score).scatter_(1, by_score, positions)
            cap = (real.sum(1, keepdim=True) - protected).clamp(min=0) // 2
            eligible = matchable & (rank < cap)
            spare = torch.full_like(best, _OVERFLOW_A).masked_fill(~real_a, _PADDED_A)
            best = torch.where(eligible, best, spare)
            # The rest go to the first padded B slot, whose size 0 leaves them intact (slot 0 if none: only padded A
            # tokens can then be left over).
            partner = torch.where(eligible, partner, (~real_b).to(torch.uint8).argmax(1, keepdim=True))
            if protect_first:
                best[:, 0] = -math.inf

        by_score = torch.sort(best, dim=1, descending=True, stable=True).indices
        src_idx = by_score[:, :r]
        plan = MergePlan(
            r=r,
            keep_idx=by_score[:, r:].sort(dim=1).values,
            src_idx=src_idx,
            dst_idx=partner.gather(1, src_idx),
        )
        if real is None:
            return plan
        # Order the slots as the sample alone would (kept A, then B, by position) with padding-only slots last: a slot
        # takes the smallest key among its tokens, and A tokens that merge into a real B must not lend it their key.
        na, pad_key = best.shape[1], 2 * n
        into_real_b = torch.zeros_like(eligible).scatter_(1, src_idx, eligible.gather(1, src_idx))
        key = torch.full_like(real_c, pad_key, dtype=torch.long)
        key[:, ::2] = torch.arange(na, device=key.device).masked_fill(~real_a | into_real_b, pad_key)
        key[:, 1::2] = torch.arange(na, n, device=key.device).masked_fill(~real_b, pad_key)
        slot_key = plan(key[..., None], "amin")[..., 0]
        out_order = torch.sort(slot_key, dim=1, stable=True).indices
        mask = slot_key.gather(1, out_order) < pad_key
        return dataclasses.replace(plan, order=order, out_order=out_order, mask=mask)


@overload
def merge_tokens(
    x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, protect_first: bool = True, *, mask: None = None
) -> tuple[Tensor, Tensor]: ...
@overload
def merge_tokens(
    x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, protect_first: bool = True, *, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]: ...
def merge_tokens(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Tensor | None = None,
    protect_first: bool = True,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """One ToMe step: `x [B, N, C]`, `metric [B, N, K]`, `size [B, N, 1]` (None: ones) -> `[B, N-r, C]`, `[B, N-r, 1]`.

    Merged values are size-weighted averages and sizes add. r is capped at `(N - protect_first) // 2`; r <= 0 returns
    x unchanged. With `mask [B, N]` (true = real) a third output is the merged mask `[B, N - r]` (bool); padded
    tokens count as size 0 (also in the returned sizes), so the merged mask equals `size > 0` when real sizes are.
    """
    if size is None:
        size = x.new_ones(*x.shape[:2], 1)
    if mask is not None:
        keep = mask.to(device=x.device, dtype=torch.bool)[..., None]
        size = size * keep
    plan = bipartite_soft_matching(metric, r, protect_first, mask=mask)
    if plan.r > 0:
        if mask is not None:
            x = x.masked_fill(~keep, 0)  # garbage padding (even inf/NaN) must not reach a sum as 0 * x
        total = plan(size, "sum")
        x = plan(x * size, "sum") / torch.where(total > 0, total, torch.ones_like(total))
        size = total
    return (x, size) if mask is None else (x, size, plan.mask)


def proportional_attention_bias(size: Tensor) -> Tensor:
    """`log(size)` as an additive bias for attention logits: `size [B, N, 1]` -> `[B, 1, 1, N]`.

    It broadcasts over heads and queries of `[B, H, N, N]` logits, so key j weighs as `size[j]` tokens in the softmax
    (ToMe's proportional attention). Size-0 (padded) keys get -inf, i.e. are masked out.
    """
    return size[..., 0].log()[:, None, None, :]


def _capped(schedule: Sequence[int], num_tokens: int, protect_first: bool) -> list[int]:
    """Cap each layer's r at half the mergeable tokens left at that layer."""
    n, out = num_tokens, []
    for r in schedule:
        r = max(0, min(int(r), (n - int(protect_first)) // 2))
        out.append(r)
        n -= r
    return out


def merge_schedule(r: RSchedule, num_layers: int, num_tokens: int, protect_first: bool = True) -> list[int]:
    """Tokens to merge at each of `num_layers` layers, capped layer by layer as `merge_tokens` would cap them.

    r is one of:
      - int: the same r at every layer;
      - list of ints: per-layer values, exactly num_layers of them;
      - tuple `(r, inflect)`, inflect in [-1, 1], or the string `"r:inflect"` (e.g. `"8:-1"`; a plain `"8"` is an int):
        a linear schedule from `r * (1 - inflect)` at the first layer to `r * (1 + inflect)` at the last, rounded,
        totalling about `r * num_layers`. inflect < 0 merges more early and less late (-1 is the paper's "decreasing"
        schedule), 0 is constant, > 0 the reverse. A tuple is always this form; give per-layer values as a list.
    """
    if num_layers < 0 or num_tokens < 0:
        raise ValueError(f"num_layers and num_tokens must be >= 0, got {num_layers} and {num_tokens}")
    if isinstance(r, str):
        base, _, inflect = r.partition(":")
        try:
            r = (int(base), float(inflect)) if inflect else int(base)
        except ValueError:
            raise ValueError(f"r {r!r} is neither an int nor 'r:inflect' (e.g. '8:-1')") from None
    if isinstance(r, bool) or (isinstance(r, int) and r < 0):
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    if isinstance(r, int):
        raw = [r] * num_layers
    elif isinstance(r, tuple):
        base, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect must lie in [-1, 1], got {inflect}")
        first, last = base * (1.0 - inflect), base * (1.0 + inflect)
        if num_layers == 1:
            raw = [base]
        else:
            step = (last - first) / (num_layers - 1)
            raw = [math.floor(first + step * i + 0.5) for i in range(num_layers)]
    else:
        raw = list(r)
        hint = " (a schedule around r is the string 'r:inflect', e.g. '4:-1')" if len(raw) == 2 else ""
        if len(raw) != num_layers:
            raise ValueError(f"per-layer r has {len(raw)} entries but num_layers is {num_layers}{hint}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in raw):
            raise ValueError(f"per-layer r must be ints >= 0, got {raw}{hint}")
    return _capped(raw, num_tokens, protect_first)


def tokens_after(num_tokens: int, schedule: Sequence[int], protect_first: bool = True) -> list[int]:
    """Token count after each layer of `schedule`, applying the same per-layer caps as `merge_tokens`."""
    counts, n = [], num_tokens
    for r in _capped(schedule, num_tokens, protect_first):
        n -= r
        counts.append(n)
    return counts
