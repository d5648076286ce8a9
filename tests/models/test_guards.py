"""The guards of VLModule, on a tiny Captioner trained by a real Lightning Trainer on CPU: a non-finite loss stops the
run (one line naming the step, the terms and the samples) or skips the step; no non-finite checkpoint is written;
unreadable samples are counted per split; a split with no readable sample stops the run; under DDP a rank whose
batch is all unreadable still takes part in the gradient all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlgen.bridges import MLPProjector
from vlgen.encoders import TimmEncoder
from vlgen.errors import RunStopped
from vlgen.llms import CausalLM, Decoding
from vlgen.models import Captioner, Optim
from vlgen.models.base import EMPTY_BATCHES_TO_STOP

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
DDP_SCRIPT = Path(__file__).with_name("ddp_guard_run.py")


def make(llm_dir: Path, lr: float = 1e-3, **kwargs) -> Captioner:
    torch.manual_seed(0)
    enc = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT)
    llm = CausalLM(str(llm_dir), decoding=Decoding(max_new_tokens=2))
    optim = Optim(lr=lr, warmup_steps=0, weight_decay=0.0)
    return Captioner(enc, MLPProjector(), llm, optim=optim, **kwargs)


def batch(ids: list[str], nan: bool = False, skipped: int = 0) -> dict:
    """A caption batch of ``ids`` (NaN pixels with ``nan``: a NaN loss), or an empty one when ``ids`` is empty."""
    pixels = torch.full((len(ids), 3, 32, 32), float("nan")) if nan else torch.randn(len(ids), 3, 32, 32)
    caps = ["a red circle"] * len(ids)
    return {"pixels": pixels, "captions": caps, "references": [[c] for c in caps], "ids": ids, "num_skipped": skipped}


def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None)


def trainer(root: Path, callbacks: list | None = None, checkpoints: bool = False, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        default_root_dir=str(root),
        callbacks=callbacks or [],
        enable_checkpointing=checkpoints or bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def trainable(m: Captioner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.bridge.state_dict().items()}


def saved_weights(directory: Path) -> list[tuple[int, dict[str, torch.Tensor]]]:
    ckpts = [torch.load(p, weights_only=False) for p in sorted(directory.glob("*.ckpt"))]
    return [(c["global_step"], c["state_dict"]) for c in ckpts]


# --- non-finite losses ----------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_before_the_update_naming_the_step_terms_and_samples(tiny_llm_dir, tmp_path):
    m = make(tiny_llm_dir)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    data = [batch(["a0", "a1"]), batch(["b0", "b1"]), batch(["bad0", "bad1"], nan=True), batch(["c0", "c1"])]
    t = trainer(tmp_path, [ckpts])
    with pytest.raises(RunStopped) as err:
        t.fit(m, train_dataloaders=loader(data))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("training step 2 (epoch 0): non-finite loss=nan lm_loss=nan (batch 2)")
    assert "['bad0', 'bad1']" in message and "model.nonfinite: skip" in message
    assert t.global_step == 2  # the NaN step was never taken
    saved = saved_weights(tmp_path / "ckpt")
    assert saved and max(step for step, _ in saved) == 2
    assert all(v.isfinite().all() for _, sd in saved for v in sd.values() if v.is_floating_point())
    last = dict(saved_weights(tmp_path / "ckpt"))[2]
    for name, value in trainable(m).items():  # the weights in memory are those of step 2: no update with NaN
        torch.testing.assert_close(value, last[f"bridge.{name}"], rtol=0, atol=0)


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step_and_saves_no_nan(tiny_llm_dir, tmp_path):
    m = make(tiny_llm_dir, lr=1e12)  # the reported case: NaN from step 3 of 8, rc 0, a NaN last.ckpt
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    data = [batch([f"s{i}a", f"s{i}b"]) for i in range(8)]
    t = trainer(tmp_path, [ckpts])
    with pytest.raises(RunStopped) as err:
        t.fit(m, train_dataloaders=loader(data))
    message = str(err.value)
    step = t.global_step
    assert "\n" not in message and 0 < step < 8
    assert message.startswith(f"training step {step} (epoch 0): non-finite ")
    assert f"['s{step}a', 's{step}b']" in message  # the samples of the step that failed
    for _, state in saved_weights(tmp_path / "ckpt"):
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())
    assert all(v.isfinite().all() for v in trainable(m).values())


def test_skip_mode_drops_the_step_counts_it_and_trains_on(tiny_llm_dir, tmp_path):
    m = make(tiny_llm_dir, nonfinite="skip")
    data = [batch(["a0", "a1"]), batch(["bad0", "bad1"], nan=True), batch(["b0", "b1"]), batch(["c0", "c1"])]
    t = trainer(tmp_path)
    t.fit(m, train_dataloaders=loader(data))
    assert m.nonfinite_skipped == 1 and float(t.callback_metrics["train/nonfinite_skipped"]) == 1.0
    assert all(v.isfinite().all() for v in trainable(m).values())
    state = t.optimizers[0].state
    steps = {int(s["step"]) for s in state.values()}
    assert state and steps == {3}  # 4 batches, 3 updates: AdamW never saw the NaN gradients


def test_skip_mode_stops_when_nothing_but_non_finite_steps_come(tiny_llm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("vlgen.models.base.NONFINITE_SKIP_LIMIT", 3)
    m = make(tiny_llm_dir, nonfinite="skip")
    data = [batch(["a0"]), *(batch([f"bad{i}"], nan=True) for i in range(5))]
    with pytest.raises(RunStopped, match=r"^training step 3 \(epoch 0\): 3 optimiser steps in a row had a non-finite"):
        trainer(tmp_path).fit(m, train_dataloaders=loader(data))
    assert m.nonfinite_skipped == 3


def test_a_checkpoint_of_non_finite_weights_is_refused(tiny_llm_dir):
    m = make(tiny_llm_dir)
    with torch.no_grad():
        m.bridge.mlp[1].weight[0, 0] = float("inf")
    with pytest.raises(
        RunStopped, match=r"^step 7: 1 trainable weights are not finite \(e\.g\. bridge\.mlp\.1\.weight"
    ):
        m.on_save_checkpoint({"state_dict": m.state_dict(), "global_step": 7})


def test_nonfinite_must_be_stop_or_skip(tiny_llm_dir):
    from vlgen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model\.nonfinite must be 'stop' or 'skip'"):
        make(tiny_llm_dir, nonfinite="ignore")


# --- skipped samples ------------------------------------------------------------------------------------------------
def test_skips_are_counted_and_reported_per_split(tiny_llm_dir, tmp_path):
    m = make(tiny_llm_dir)
    train = [batch(["a0", "a1"], skipped=2), batch(["b0"], skipped=0), batch(["c0"], skipped=3)]
    val = [batch(["v0", "v1"], skipped=1)]
    t = trainer(tmp_path)
    t.fit(m, train_dataloaders=loader(train), val_dataloaders=loader(val))  # validation runs before train's epoch end
    assert float(t.callback_metrics["train/skipped"]) == 5.0
    assert float(t.callback_metrics["val/skipped"]) == 1.0

    t = trainer(tmp_path / "test")
    t.test(m, dataloaders=loader([batch(["t0", "t1"], skipped=2), batch([], skipped=1)]))
    assert float(t.callback_metrics["test/skipped"]) == 3.0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["skipped"] == 3

    t = trainer(tmp_path / "predict")
    t.predict(m, dataloaders=loader([batch(["p0", "p1"], skipped=1), batch(["p2"])]))
    summary = json.loads((tmp_path / "predict" / "predict_summary.json").read_text())
    assert summary == {"predictions": 3, "skipped": 1}
    assert len((tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("with_val", [False, True])
def test_a_training_epoch_without_a_readable_sample_stops_and_writes_no_checkpoint(tiny_llm_dir, tmp_path, with_val):
    m = make(tiny_llm_dir)
    before = trainable(m)
    val = loader([batch(["v0"])]) if with_val else None
    t = trainer(tmp_path, checkpoints=True)
    expected = (
        r"^train: no usable sample in epoch 0 before this validation \(6 skipped as unreadable\)"
        if with_val
        else r"^train: every sample of the epoch was unreadable \(6 skipped, none usable\)"
    )
    with pytest.raises(RunStopped, match=expected):
        t.fit(m, train_dataloaders=loader([batch([], skipped=2)] * 3), val_dataloaders=val)
    assert not list(tmp_path.rglob("*.ckpt"))
    assert all(torch.equal(v, before[k]) for k, v in trainable(m).items())  # no step without data


def test_the_first_empty_batches_of_a_long_epoch_stop_it_early(tiny_llm_dir, tmp_path):
    m = make(tiny_llm_dir)
    t = trainer(tmp_path)
    match = rf"^train: the first {EMPTY_BATCHES_TO_STOP} batches of epoch 0 held no usable sample \(40 skipped"
    with pytest.raises(RunStopped, match=match):
        t.fit(m, train_dataloaders=loader([batch([], skipped=2)] * (EMPTY_BATCHES_TO_STOP + 30)))
    assert t.fit_loop.epoch_loop.batch_progress.current.ready == EMPTY_BATCHES_TO_STOP


@pytest.mark.parametrize("verb", ["test", "predict"])
def test_an_evaluation_without_a_readable_sample_stops_and_writes_nothing(tiny_llm_dir, tmp_path, verb):
    m = make(tiny_llm_dir)
    t = trainer(tmp_path)
    with pytest.raises(
        RunStopped, match=rf"^{verb}: every sample of the epoch was unreadable \(4 skipped, none usable"
    ):
        getattr(t, verb)(m, dataloaders=loader([batch([], skipped=2)] * 2))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "predictions.jsonl").exists()
    assert not (tmp_path / "predict_summary.json").exists()


# --- DDP ------------------------------------------------------------------------------------------------------------
@pytest.mark.ddp
def test_ddp_a_rank_with_only_unreadable_batches_joins_every_step_and_a_nan_stops_both(tiny_llm_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(DDP_SCRIPT), "--llm", str(tiny_llm_dir), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["global_step"] == 2 and r["train_skipped"] == 4.0  # 2 + 2 skipped on rank 1, summed over ranks
        assert r["finite"] and r["trained"] != r["initial"]  # rank 0's gradients trained both ranks' copies
    assert ranks[0]["trained"] == ranks[1]["trained"]
    # a NaN loss on rank 1 only: both ranks stop at step 0 with the same line, before any update
    assert ranks[0]["stopped"] == ranks[1]["stopped"]
    assert ranks[0]["stopped"].startswith("training step 0 (epoch 0): non-finite rank 1: loss=nan lm_loss=nan")
    assert "['bad0', 'bad1']" in ranks[0]["stopped"] and all(r["unchanged"] for r in ranks)


@pytest.mark.ddp
def test_fsdp2_a_step_with_an_empty_rank_is_skipped_by_all_and_a_nan_stops_both(tiny_llm_dir, tmp_path):
    """Sharded, every rank must run the same forward (its gathers): a step where one rank has no usable sample is
    skipped by every rank, rather than leaving the other waiting; the non-finite guard stops both ranks alike."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(DDP_SCRIPT), "--llm", str(tiny_llm_dir), "--out", str(tmp_path), "--strategy", "fsdp2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["train_skipped"] == 4.0 and r["finite"]
        assert r["trained"] == r["initial"]  # rank 1 had nothing at either step: nobody stepped
        assert r["grounding_checks"] == 0  # the monitor's sharded passes are skipped by both ranks, not one
    assert ranks[0]["stopped"] == ranks[1]["stopped"]
    assert ranks[0]["stopped"].startswith("training step 0 (epoch 0): non-finite rank 1: loss=nan lm_loss=nan")
    assert all(r["unchanged"] for r in ranks)
