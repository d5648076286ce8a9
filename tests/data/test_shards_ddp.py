"""Shards under Lightning's DDP on CPU (gloo): 2 ranks x 2 workers, and a 2-rank checkpoint resumed on 1 rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shard_helpers import write_image_shards

from vlgen.data.shards.order import dropped_remainder

SCRIPT = Path(__file__).with_name("ddp_shard_run.py")
SIZES = [7, 13, 5, 11, 9]  # 45 samples in uneven shards


def run(tmp: Path, name: str, *args: str) -> dict[int, list[dict]]:
    out = tmp / name
    out.mkdir()
    shards = str(tmp / "shards" / "{00000..00004}.tar")
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent)}
    cmd = [sys.executable, str(SCRIPT), "--shards", shards, "--out", str(out), "--index", str(tmp / "index"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(out.glob("rank*"))
    }


def ids_of(records: list[dict], epoch: int) -> list[list[str]]:
    return [r["ids"] for r in records if r["epoch"] == epoch]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_two_workers_and_a_resume_on_one_rank(tmp_path):
    write_image_shards(tmp_path / "shards", SIZES)
    single = run(tmp_path, "single", "--epochs", "2")[0]
    pair = run(tmp_path, "pair", "--devices", "2", "--workers", "2", "--epochs", "2")
    dropped = dropped_remainder(0, 45, world=2, batch=2, keep_short=False)
    for epoch in (0, 1):
        order = [i for b in ids_of(single, epoch) for i in b]
        assert sorted(order) == sorted(f"s{n}" for n in range(45))  # every sample once per epoch
        r0, r1 = ids_of(pair[0], epoch), ids_of(pair[1], epoch)
        assert len(r0) == len(r1) == 11  # the same number of steps on both ranks: no DDP hang
        interleaved = [x for b0, b1 in zip(r0, r1) for pair_ in zip(b0, b1) for x in pair_]
        assert interleaved == order[: 45 - dropped]  # by global position, the 1-rank order
    assert ids_of(single, 0) != ids_of(single, 1)  # epoch 2 in a different order

    first = run(tmp_path, "first", "--devices", "2", "--workers", "2", "--max_steps", "5", "--ckpt_every", "5")
    ckpt = tmp_path / "first" / "step=5.ckpt"
    assert ckpt.is_file()
    rest = run(tmp_path, "rest", "--workers", "2", "--epochs", "1", "--ckpt_path", str(ckpt))[0]
    before = [i for r in (0, 1) for b in ids_of(first[r], 0) for i in b]
    after = [i for b in ids_of(rest, 0) for i in b]
    assert len(before) == 20 and not set(before) & set(after)
    assert sorted(before + after) == sorted(f"s{n}" for n in range(45))  # the remaining samples, each once


@pytest.mark.slow
def test_resume_from_an_end_of_epoch_checkpoint_starts_the_next_epoch(tmp_path):
    write_image_shards(tmp_path / "shards", SIZES)
    straight = run(tmp_path, "straight", "--epochs", "2")[0]
    run(tmp_path, "first", "--epochs", "1", "--ckpt_epoch_end")
    ckpt = tmp_path / "first" / "epoch=0.ckpt"
    rest = run(tmp_path, "rest", "--epochs", "2", "--ckpt_path", str(ckpt))[0]
    assert [r["epoch"] for r in rest] == [1] * len(ids_of(straight, 1))
    assert ids_of(rest, 1) == ids_of(straight, 1)  # epoch 1, in epoch 1's order, once
