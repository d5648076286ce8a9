"""Token merging (ToMe): exact agreement with a plain-loop reference, invariants, padding masks, schedules."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from vlgen.bridges.tome import (
    bipartite_soft_matching,
    merge_schedule,
    merge_tokens,
    proportional_attention_bias,
    tokens_after,
)


def _inputs(b: int, n: int, c: int = 3, k: int = 4, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=dtype)
    metric = torch.randn(b, n, k, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (b, n, 1), generator=g).to(dtype)
    return x, metric, size


def reference_merge(x, metric, r, size=None, protect_first=True):
    """One bipartite soft-matching step with Python loops; output order: kept A (ascending), then B (ascending)."""
    bsz, n, c = x.shape
    size = torch.ones(bsz, n, 1, dtype=x.dtype) if size is None else size
    r = min(r, (n - int(protect_first)) // 2)
    if r <= 0:
        return x.clone(), size.clone()
    outs_x, outs_s = [], []
    for s in range(bsz):
        rows, sizes = x[s].tolist(), [v[0] for v in size[s].tolist()]
        unit = [[v / math.sqrt(sum(u * u for u in vec)) for v in vec] for vec in metric[s].tolist()]
        set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for i in set_a:
            if protect_first and i == 0:
                continue
            best[i] = max((sum(u * v for u, v in zip(unit[i], unit[j])), j) for j in set_b)
        merged = sorted(best, key=lambda i: best[i][0], reverse=True)[:r]
        groups = {j: [j] for j in set_b}
        for i in merged:
            groups[best[i][1]].append(i)
        out_groups = [[i] for i in set_a if i not in merged] + [groups[j] for j in set_b]
        out_x, out_s = [], []
        for group in out_groups:
            total = sum(sizes[i] for i in group)
            out_x.append([sum(rows[i][ch] * sizes[i] for i in group) / total for ch in range(c)])
            out_s.append([total])
        outs_x.append(out_x)
        outs_s.append(out_s)
    return torch.tensor(outs_x, dtype=x.dtype), torch.tensor(outs_s, dtype=x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("n", [5, 8, 9])
def test_matches_reference(n, protect_first, dtype):
    x, metric, size = _inputs(2, n, seed=n, dtype=dtype)
    cap = (n - int(protect_first)) // 2
    for r in sorted({0, 1, 2, cap, cap + 3}):
        for sz in (None, size):
            out, out_size = merge_tokens(x, metric, r, sz, protect_first=protect_first)
            ref, ref_size = reference_merge(x, metric, r, sz, protect_first=protect_first)
            assert out.shape == ref.shape == (2, n - min(r, cap), 3)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
            torch.testing.assert_close(out_size, ref_size, atol=0, rtol=0)


def test_invariants():
    x, metric, size = _inputs(3, 17, c=5)
    for r in (1, 4, 8):
        out, out_size = merge_tokens(x, metric, r, size)
        assert out.shape == (3, 17 - r, 5) and out_size.shape == (3, 17 - r, 1)
        torch.testing.assert_close(out_size.sum(1), size.sum(1))
        # the size-weighted mean of the features is what merging preserves
        torch.testing.assert_close((out * out_size).sum(1) / out_size.sum(1), (x * size).sum(1) / size.sum(1))
        # token 0 stays first, untouched
        torch.testing.assert_close(out[:, 0], x[:, 0])
        torch.testing.assert_close(out_size[:, 0], size[:, 0])
    _, ones = merge_tokens(x, metric, 4)
    assert ones.sum().item() == 3 * 17


def test_r_zero_and_capping():
    x, metric, _ = _inputs(2, 9)
    out, size = merge_tokens(x, metric, 0)
    assert out is x and torch.equal(size, torch.ones(2, 9, 1, dtype=x.dtype))
    out, _ = merge_tokens(x, metric, -3)
    assert out is x
    assert merge_tokens(x, metric, 100)[0].shape[1] == 9 - 4  # (9 - 1) // 2 merges at most
    assert merge_tokens(x, metric, 100, protect_first=False)[0].shape[1] == 9 - 4
    assert merge_tokens(x[:, :8], metric[:, :8], 100, protect_first=False)[0].shape[1] == 4


def test_protect_first_blocks_the_best_match():
    x, metric, _ = _inputs(1, 6)
    metric[0, 0] = metric[0, 1]  # token 0 is the closest pair of all: it merges first unless protected
    out, size = merge_tokens(x, metric, 1, protect_first=True)
    assert torch.equal(out[0, 0], x[0, 0]) and size[0, 0].item() == 1
    out, size = merge_tokens(x, metric, 1, protect_first=False)
    slot = 2  # outputs: kept A tokens 2, 4, then B tokens 1, 3, 5
    assert size[0, slot].item() == 2 and out.shape[1] == 5
    torch.testing.assert_close(out[0, slot], (x[0, 0] + x[0, 1]) / 2)


def test_multi_layer_schedule_counts():
    x, _, _ = _inputs(2, 50, c=8)
    schedule = merge_schedule((6, -1.0), num_layers=6, num_tokens=50)
    size = None
    counts = []
    for r in schedule:
        x, size = merge_tokens(x, x, r, size)
        counts.append(x.shape[1])
    assert counts == tokens_after(50, schedule)
    assert size.sum(1).flatten().tolist() == [50.0, 50.0]


def test_plan_applies_to_any_tensor():
    x, metric, size = _inputs(2, 9, c=3)
    plan = bipartite_soft_matching(metric, 3)
    out, _ = merge_tokens(x, metric, 3, size)
    torch.testing.assert_close(plan(x * size, "sum") / plan(size, "sum"), out)
    assert torch.equal(plan(torch.ones(2, 9)), merge_tokens(x, metric, 3)[1][..., 0])  # [B, N] works too
    assert plan(torch.randn(2, 9, 2, 5)).shape == (2, 6, 2, 5)
    pos = torch.arange(9.0).expand(2, 9)
    lo, hi, count = plan(pos, "amin"), plan(pos, "amax"), plan(torch.ones(2, 9))
    assert lo[:, 0].tolist() == [0.0, 0.0] and torch.equal(lo == hi, count == 1) and (lo <= hi).all()
    torch.testing.assert_close(plan(x, "mean"), merge_tokens(x, metric, 3)[0])
    with pytest.raises(ValueError, match="reduce"):
        plan(x, "prod")


def _padded_batch(real: torch.Tensor, n: int, where: list[int] | None = None):
    """Batch of 2: row 0 holds `real` [M, C] at positions `where` (default: first M) among garbage; row 1 is random."""
    m, c = real.shape
    where = list(range(m)) if where is None else where
    x = torch.full((2, n, c), 1e6, dtype=real.dtype)
    x[0, ::3] = math.nan
    x[0, 1::4] = -math.inf
    x[1] = torch.randn(n, c, dtype=real.dtype, generator=torch.Generator().manual_seed(7))
    x[0, where] = real
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0] = False
    mask[0, where] = True
    return x, mask


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("layout", ["end", "middle"])
def test_padding_matches_unpadded(layout, protect_first):
    n_real, n = 7, 12
    real_x, real_m, real_size = _inputs(1, n_real, c=4, k=4, seed=3)
    where = None if layout == "end" else [0, 2, 3, 6, 7, 9, 11]
    x, mask = _padded_batch(real_x[0], n, where)
    metric, _ = _padded_batch(real_m[0], n, where)
    size = torch.ones(2, n, 1, dtype=x.dtype)
    size[0, mask[0]] = real_size[0]
    cap_alone = (n_real - int(protect_first)) // 2
    cap = (n - int(protect_first)) // 2
    for r in range(0, cap + 2):
        out, out_size, out_mask = merge_tokens(x, metric, r, size, protect_first, mask=mask)
        alone, alone_size = merge_tokens(real_x, real_m, min(r, cap_alone), real_size, protect_first)
        assert out.shape == (2, n - min(r, cap), 4) and out_mask.dtype == torch.bool
        k = alone.shape[1]
        if r > 0:
            assert out.isfinite().all() and out_size.isfinite().all()  # garbage (NaN, inf, 1e6) never leaks
            assert out_mask[0].tolist() == [True] * k + [False] * (out.shape[1] - k)
            assert torch.equal(out_mask, out_size[..., 0] > 0)
            assert out_size[0, k:].eq(0).all() and out[0, k:].eq(0).all()
            torch.testing.assert_close(out[0, :k], alone[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(out_size[0, :k], alone_size[0], atol=0, rtol=0)
        else:
            assert torch.equal(out_mask, mask) and out is x  # r = 0 returns the inputs as they are
        # the fully real row is unaffected by its neighbour's padding
        full, full_size = merge_tokens(x[1:], metric[1:], r, size[1:], protect_first)
        torch.testing.assert_close(out[1:], full)
        torch.testing.assert_close(out_size[1:], full_size)
        assert out_mask[1].all()


def test_padding_overflow_moves_real_tokens_unchanged():
    # N=6, five real tokens, no protection: alone merges at most 2, the batch asks 3; A = 0, 2, 4 are all real,
    # so the third merge must move a real A token into the padded B slot 5 without changing it.
    real_x, real_m, real_size = _inputs(1, 5, seed=11)
    x, mask = _padded_batch(real_x[0], 6)
    metric, _ = _padded_batch(real_m[0], 6)
    size = torch.ones(2, 6, 1, dtype=x.dtype)
    size[0, :5] = real_size[0]
    out, out_size, out_mask = merge_tokens(x, metric, 3, size, protect_first=False, mask=mask)
    alone, alone_size = merge_tokens(real_x, real_m, 3, real_size, protect_first=False)
    assert alone.shape[1] == 3 and out.shape[1] == 3 and out_mask[0].all()
    torch.testing.assert_close(out[0], alone[0], atol=1e-12, rtol=0)
    assert torch.equal(out_size[0], alone_size[0])


def test_random_masks_match_unpadded():
    g = torch.Generator().manual_seed(5)
    for trial in range(16):
        n = 4 + trial % 6
        x, metric, size = _inputs(1, n, seed=100 + trial)
        mask = torch.rand(1, n, generator=g) < 0.6
        mask[0, trial % n] = True
        protect_first = bool(trial % 2)
        for r in range(1, n // 2 + 1):
            if r > (n - int(protect_first)) // 2:
                continue
            out, out_size, out_mask = merge_tokens(x, metric, r, size, protect_first, mask=mask)
            alone, alone_size = merge_tokens(x[:, mask[0]], metric[:, mask[0]], r, size[:, mask[0]], protect_first)
            k = alone.shape[1]
            assert out_mask[0].tolist() == [True] * k + [False] * (out.shape[1] - k)
            torch.testing.assert_close(out[0, :k], alone[0], atol=1e-12, rtol=0)
            assert torch.equal(out_size[0, :k], alone_size[0]) and out_size[0, k:].eq(0).all()


def test_all_real_mask_equals_unmasked_and_empty_sample_is_finite():
    x, metric, size = _inputs(2, 9)
    out, out_size, out_mask = merge_tokens(x, metric, 3, size, mask=torch.ones(2, 9))
    ref, ref_size = merge_tokens(x, metric, 3, size)
    assert torch.equal(out, ref) and torch.equal(out_size, ref_size) and out_mask.all()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out, out_size, out_mask = merge_tokens(x, metric, 4, size, mask=mask)
    assert out.isfinite().all() and not out_mask[1].any() and out_size[1].eq(0).all()


def test_gradients_flow():
    x, _, size = _inputs(2, 9, dtype=torch.float32)
    x.requires_grad_(True)
    out, _ = merge_tokens(x, x, 3, size)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum(-1).gt(0).all()

    x2, mask = _padded_batch(torch.randn(5, 3), 8)
    x2.requires_grad_(True)
    out, _, _ = merge_tokens(x2, x2.detach().nan_to_num(0, 0, 0), 2, mask=mask)
    out.sum().backward()
    assert x2.grad.isfinite().all() and x2.grad[~mask].eq(0).all() and x2.grad[mask].ne(0).all()


def test_merge_schedule_forms():
    assert merge_schedule(4, 3, 50) == [4, 4, 4]
    assert merge_schedule(10, 4, 17) == [8, 4, 2, 1]  # capped at half the mergeable tokens left
    assert merge_schedule(10, 2, 17, protect_first=False) == [8, 4]
    assert merge_schedule([3, 2, 1], 3, 50) == [3, 2, 1]
    assert merge_schedule([30, 2], 2, 20) == [9, 2]
    with pytest.raises(ValueError, match=r"2 entries.*num_layers is 3"):
        merge_schedule([3, 2], 3, 50)
    assert merge_schedule((8, 0.0), 12, 197) == [8] * 12
    assert merge_schedule("8", 3, 197) == [8] * 3
    with pytest.raises(ValueError, match="inflect"):
        merge_schedule((8, -1.5), 4, 197)


def test_merge_schedule_refuses_what_it_would_misread():
    """A two-entry list with a negative entry is a per-layer list (YAML has no tuples), never capped to 0 silently;
    the error points to the string form of a schedule."""
    with pytest.raises(ValueError, match=r"ints >= 0, got \[4, -1\].*'r:inflect'"):
        merge_schedule([4, -1], 2, 50)
    with pytest.raises(ValueError, match=r"3 entries but num_layers is 2"):
        merge_schedule([4, 2, 1], 2, 50)
    with pytest.raises(ValueError, match="int >= 0"):
        merge_schedule(-3, 2, 50)
    with pytest.raises(ValueError, match="neither an int nor 'r:inflect'"):
        merge_schedule("four", 2, 50)
    assert merge_schedule("4:-1", 2, 50) == [8, 0]


def test_decreasing_schedule():
    sched = merge_schedule((8, -1.0), 12, 197)
    assert sched == merge_schedule("8:-1", 12, 197)
    assert all(a >= b for a, b in pairwise(sched)) and sched[0] == 16 and sched[-1] == 0
    assert abs(sum(sched) - 8 * 12) <= 1
    half = merge_schedule((8, -0.5), 12, 197)
    assert all(a >= b for a, b in pairwise(half)) and half[0] == 12 and half[-1] == 4
    assert merge_schedule((8, 1.0), 12, 197) == sched[::-1]
    tight = merge_schedule((16, -1.0), 8, 40)
    n = 40
    for r in tight:
        assert r <= (n - 1) // 2
        n -= r
    assert all(a >= b for a, b in pairwise(tight)) and tight[0] == 19
    assert tokens_after(40, tight) == [40 - sum(tight[: i + 1]) for i in range(8)]


def test_tokens_after():
    assert tokens_after(197, [16] * 3) == [181, 165, 149]
    assert tokens_after(9, [100, 100]) == [5, 3]
    assert tokens_after(9, []) == []


def test_proportional_attention_bias():
    size = torch.tensor([[[1.0], [2.0], [4.0]], [[3.0], [1.0], [0.0]]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (2, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, math.log(2), math.log(4)]))
    assert bias[1, 0, 0, 2].item() == -math.inf
    # attending over merged keys with the bias equals attending over the unmerged (duplicated) keys
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g) for n in (5, 2, 2))
    merged_size = torch.tensor([[[3.0], [1.0]]])
    logits = q @ k.transpose(-1, -2) + proportional_attention_bias(merged_size)
    dup_k, dup_v = k[:, :, [0, 0, 0, 1]], v[:, :, [0, 0, 0, 1]]
    expected = torch.softmax(q @ dup_k.transpose(-1, -2), -1) @ dup_v
    torch.testing.assert_close(torch.softmax(logits, -1) @ v, expected)
