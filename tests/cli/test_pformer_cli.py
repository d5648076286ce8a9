"""P-Former through the `vlgen` command: tiny stage 0, then the tiny captioner aligned to its checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, WORLD, run_dirs, tiny_encoder, tiny_lm, vlgen

STAGE0 = REPO / "configs" / "tiny" / "pformer_stage0.yaml"
ALIGN = REPO / "configs" / "tiny" / "pformer_align.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_bert_dir) -> Path:
    """Overrides for both runs: a small world, a tiny BERT for the P-Former, quick tiny LM and encoder."""
    work = tmp_path_factory.mktemp("pformer")
    world = {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": WORLD}
    llm = tiny_lm(work, world, steps=20)
    pformer = {"init_args": {"bert": str(tiny_bert_dir)}}  # 2 layers, as num_layers keeps
    teacher = {"num_prompts": 4, "num_layers": 2, "pooling": "mean", "init_from": "runs/tiny-pformer-stage0/last.ckpt"}
    aligned = {"init_args": {"bert": str(tiny_bert_dir), **teacher}}
    trainer = {"max_steps": 4, "limit_val_batches": 1, "log_every_n_steps": 2}
    stage0 = {
        "trainer": {**trainer, "val_check_interval": 4},
        "model": {"init_args": {"pformer": pformer, "llm": {"init_args": llm}}},
        "data": {
            "init_args": {
                "train_files": [str(work / "shapes" / "corpus.txt")],
                "val_files": [str(work / "shapes" / "val.json")],
                "generate": world,
                "batch_size": 8,
                "eval_batch_size": 8,
                "num_workers": 0,
            }
        },
    }
    align = {
        "trainer": {**trainer, "val_check_interval": 4},
        "model": {
            "init_args": {
                "llm": {"init_args": llm},
                "objectives": [  # a list is replaced whole: configs/tiny/pformer_align.yaml's entry, tiny BERT
                    {
                        "class_path": "vlgen.objectives.PromptAlignment",
                        "init_args": {"weight": 100.0, "pformer": {"class_path": "vlgen.bridges.PFormer", **aligned}},
                    }
                ],
                "encoder": {"init_args": tiny_encoder(work, world)},
            }
        },
        "data": {"init_args": {"root": str(work / "shapes"), "generate": world, "batch_size": 8, "num_workers": 0}},
    }
    for name, override in (("stage0", stage0), ("align", align)):
        (work / f"{name}.yaml").write_text(yaml.safe_dump(override))
    return work


def logged_columns(run: Path) -> set[str]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


@pytest.mark.slow
def test_stage0_then_aligned_captioner(workdir):
    vlgen("fit", "--config", str(STAGE0), "--config", str(workdir / "stage0.yaml"), cwd=workdir)
    ckpt = workdir / "runs" / "tiny-pformer-stage0" / "last.ckpt"  # where configs/tiny/pformer_align.yaml looks
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["pformer.expand.weight"].shape[0] == 4 * 32  # 4 prompts of the tiny BERT's width
    assert not any(k.startswith("llm.") for k in state)
    stage0 = logged_columns(run_dirs(workdir)[-1])
    assert {"train/lm", "train/contrastive", "train/vq", "val/exact_match", "val/lm"} <= stage0

    vlgen("fit", "--config", str(ALIGN), "--config", str(workdir / "align.yaml"), cwd=workdir)
    run = run_dirs(workdir)[-1]
    assert {"train/align", "train/lm_loss", "val/CIDEr"} <= logged_columns(run)
    aligned = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert "bridge.proj.1.weight" in aligned and not any(k.startswith("objectives.") for k in aligned)


@pytest.mark.slow
def test_align_with_another_prompt_count_stops_with_one_line(workdir):
    # 128 px images: a 4x4 map, 16 prompts from the projector; checked before any checkpoint is read.
    transform = {"input_size": [3, 128, 128], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    encoder = {"model": {"init_args": {"encoder": {"init_args": {"transform": transform}}}}}
    (workdir / "big.yaml").write_text(yaml.safe_dump(encoder))
    configs = [str(ALIGN), str(workdir / "align.yaml"), str(workdir / "big.yaml")]
    proc = vlgen("fit", *[a for c in configs for a in ("--config", c)], cwd=workdir, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlgen: error: model.objectives: align")
    assert "bridge gives 16 prompts but the P-Former gives 4" in last
