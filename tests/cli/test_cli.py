"""End-to-end runs of the `vlgen` command on the tiny config: fit, test, resume, predict, DDP, config errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

from vlgen.metrics import CaptionMetrics

TINY = REPO / "configs" / "tiny" / "linear.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A run directory with an override config: a small world and a quickly pre-trained tiny LM and encoder."""
    work = tmp_path_factory.mktemp("cli")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    override = {
        "trainer": {"max_steps": 40, "limit_val_batches": 1, "log_every_n_steps": 5},
        "model": {
            "init_args": {
                "encoder": {"init_args": tiny_encoder(work, world)},
                "llm": {"init_args": tiny_lm(work, world, steps=150)},
                "optim": {"warmup_steps": 5},
            }
        },
        "data": {"init_args": {"root": str(work / "shapes"), "generate": world, "batch_size": 16, "num_workers": 0}},
    }
    (work / "override.yaml").write_text(yaml.safe_dump(override))
    return work


def config_args(work: Path) -> list[str]:
    return ["--config", str(TINY), "--config", str(work / "override.yaml")]


@pytest.mark.slow
def test_fit_test_resume_predict(workdir):
    vlgen("fit", *config_args(workdir), cwd=workdir)
    run = run_dirs(workdir)[-1]
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2  # the loss falls

    ckpt_path = run / "checkpoints" / "last.ckpt"
    assert ckpt_path.stat().st_size < 10 * 2**20  # trainable weights (the bridge) + optimiser only
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 40
    assert not [k for k in ckpt["state_dict"] if k.startswith("llm.")]
    assert any(k.startswith("bridge.") for k in ckpt["state_dict"])

    vlgen("test", *config_args(workdir), "--ckpt_path", str(ckpt_path), cwd=workdir)
    test_run = run_dirs(workdir)[-1]
    scores = json.loads((test_run / "metrics.json").read_text())
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores)
    predictions = [json.loads(line) for line in open(test_run / "predictions.jsonl")]
    assert len(predictions) == WORLD["num_test"] and len({p["id"] for p in predictions}) == WORLD["num_test"]
    # metrics.json is what CaptionMetrics gives on predictions.jsonl
    again = CaptionMetrics()
    again.update([p["caption"] for p in predictions], [p["references"] for p in predictions])
    assert again.compute()["CIDEr"] == pytest.approx(scores["CIDEr"], abs=1e-9)

    vlgen("fit", *config_args(workdir), "--trainer.max_steps", "50", "--ckpt_path", str(ckpt_path), cwd=workdir)
    resumed = torch.load(run_dirs(workdir)[-1] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 50  # continued from step 40, optimizer state restored
    assert resumed["optimizer_states"][0]["state"]

    photos = workdir / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.png").write_bytes((workdir / "shapes" / "images" / f"test_00000{i}.png").read_bytes())
    (photos / "broken.jpg").write_bytes(b"not an image")
    vlgen(
        "predict", *config_args(workdir), "--ckpt_path", str(ckpt_path), "--data.predict_dir", str(photos), cwd=workdir
    )
    lines = [json.loads(x) for x in open(run_dirs(workdir)[-1] / "predictions.jsonl")]
    assert sorted(x["id"] for x in lines) == ["p0.png", "p1.png", "p2.png"]
    assert all(isinstance(x["caption"], str) for x in lines)


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_ddp_test_matches_one_process(workdir):
    if not (workdir / "lm").exists():
        vlgen("fit", *config_args(workdir), "--trainer.max_steps", "5", cwd=workdir)
    ckpt = next(iter(sorted((workdir / "runs").rglob("last.ckpt"))))
    scores = []
    for extra in ([], ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]):
        vlgen("test", *config_args(workdir), "--ckpt_path", str(ckpt), *extra, cwd=workdir)
        run = run_dirs(workdir)[-1]
        preds = sorted(json.loads(x)["id"] for x in open(run / "predictions.jsonl"))
        scores.append((json.loads((run / "metrics.json").read_text()), preds))
    assert scores[0][1] == scores[1][1]  # every test image once, none duplicated by the sampler's padding
    assert scores[0][0] == pytest.approx(scores[1][0], abs=1e-9)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model.bogus", "1"], "bogus"),
        (["--config", "{work}/no_llm.yaml"], "llm.name_or_path"),
        (["--config", "{work}/no_root.yaml"], "data.root"),
        (["--data.train_file", "missing.json"], "data.train_file"),
    ],
)
def test_config_mistakes_stop_with_one_line(workdir, extra, needle):
    llm = {"name_or_path": "./no/such/model", "build_if_missing": None}
    (workdir / "no_llm.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"llm": {"init_args": llm}}}}))
    (workdir / "no_root.yaml").write_text(
        yaml.safe_dump({"data": {"init_args": {"root": "/no/root", "generate": None}}})
    )
    extra = [x.format(work=workdir) for x in extra]
    proc = vlgen("fit", *config_args(workdir), *extra, cwd=workdir, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlgen: error:") and needle in last
    assert "Traceback" not in proc.stderr
