"""Running the `vlgen` command in a subprocess, as a user does, for the end-to-end tests of this folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORLD = {"seed": 0, "num_train": 150, "num_val": 16, "num_test": 24, "num_text": 3000}  # a small shapes world


def vlgen(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``vlgen ARGS`` in ``cwd`` (in ``env``, default this process's); with ``check``, a non-zero exit fails the
    test with the end of stderr."""
    env = {**(os.environ if env is None else env), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlgen.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vlgen {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_dirs(work: Path) -> list[Path]:
    """The CSV logger's run directories under ``work/runs/vlgen``, oldest first."""
    return sorted((work / "runs" / "vlgen").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def tiny_encoder(work: Path, world: dict) -> dict:
    """Encoder ``init_args`` overrides: the tiny configs' encoder, quickly pre-trained into ``work``."""
    recipe = {"world": world, "num_images": 200, "steps": 50, "num_held_out": 0}
    return {
        "checkpoint_path": str(work / "encoder.pth"),
        "build_if_missing": {"class_path": "vlgen.data.synthetic.tiny_encoder.ShapesTinyEncoder", "init_args": recipe},
    }


def tiny_lm(work: Path, world: dict, steps: int) -> dict:
    """LLM ``init_args`` overrides: the tiny world LM, pre-trained for ``steps`` steps into ``work/lm``."""
    recipe = {"world": world, "world_root": str(work / "shapes"), "steps": steps}
    return {
        "name_or_path": str(work / "lm"),
        "build_if_missing": {"class_path": "vlgen.data.synthetic.tiny_lm.ShapesTinyLM", "init_args": recipe},
    }


def cider(captions: list[str], references: list[list[str]]) -> float:
    """CIDEr-D of ``captions`` against ``references`` (pycocoevalcap, on the Python PTB tokenizer's output)."""
    from pycocoevalcap.cider.cider import Cider

    from vlgen.metrics.captioning import simple_ptb_tokenize

    gts = {i: [simple_ptb_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_ptb_tokenize(c)] for i, c in enumerate(captions)}
    return float(Cider().compute_score(gts, res)[0])


def model_and_best_constant_cider(run: Path, count: int) -> tuple[float, float]:
    """CIDEr-D of the ``count`` test predictions in ``run`` and of the best caption said for every sample (the best
    of the samples' own first references): the bar a captioner that ignores its input cannot pass."""
    predictions = [json.loads(line) for line in open(run / "predictions.jsonl")]
    assert len(predictions) == count
    references = [p["references"] for p in predictions]
    model = cider([p["caption"] for p in predictions], references)
    constant = max(cider([c] * len(references), references) for c in {refs[0] for refs in references})
    print(f"CIDEr-D: model {model:.3f}, best constant caption {constant:.3f}")
    return model, constant
