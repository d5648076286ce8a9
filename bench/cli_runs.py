"""What the benchmarks that drive the ``vlgen`` command share: running it, finding its runs, YAML overlays."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"


def vlgen(args: list[str], cwd: Path) -> float:
    """Run ``vlgen ARGS`` in ``cwd``; return its wall time. Stops the benchmark with the end of stderr on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlgen.cli", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vlgen {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def latest_run(cwd: Path) -> Path:
    """The newest CSV-logger run directory under ``cwd/runs/vlgen``."""
    return max((cwd / "runs" / "vlgen").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def last_logged(run: Path, key: str) -> float | None:
    values = [row[key] for row in csv.DictReader(open(run / "metrics.csv")) if row.get(key)]
    return float(values[-1]) if values else None


def overlay(work: Path, name: str, content: dict) -> list[str]:
    """``--config`` args for a YAML overlay written to ``work/NAME.yaml`` (nested nulls need YAML, not the CLI)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return ["--config", str(path)]


def workdir(path: Path) -> Path:
    """Make ``path`` and link the world, tiny LM and tiny encoder that the tiny configs already built into it."""
    work = path.resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name in ("shapes-tiny", "shapes-tiny-lm", "shapes-tiny-encoder.pth", "shapes-video", "shapes-video-lm"):
        if (REPO / "data" / name).exists() and not (work / "data" / name).exists():
            (work / "data" / name).symlink_to(REPO / "data" / name)
    return work
