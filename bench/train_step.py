"""Training-step throughput and peak memory for any vlgen config.

    python bench/train_step.py --config configs/tiny/linear.yaml [--steps 10] [--warmup 2] [--autocast bf16]

Builds the model and data exactly as ``vlgen fit`` would (same config parsing), then times forward + backward +
optimiser step on real batches from the train loader. Prints samples/s and peak memory (CUDA allocator peak on GPU,
process peak RSS on CPU), the FLOPs of one step (``torch.utils.flop_counter``: matmuls, convolutions, attention)
and the model FLOP utilisation: those FLOPs per second over this machine's measured matmul peak in the dtype the
step computes in (``--autocast``; by default as the config's ``trainer.precision`` says: ``bf16-mixed`` is bf16).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def matmul_peak(dtype: torch.dtype) -> float:
    """This machine's matmul throughput (FLOP/s) in ``dtype`` on a 2048 x 2560 x 2560 product (OPT-2.7B's width),
    the yardstick of the model FLOP utilisation."""
    a, b = torch.randn(2048, 2560, dtype=dtype), torch.randn(2560, 2560, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048 * 2560 * 2560 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--autocast", choices=["config", "none", "bf16", "fp16"], default="config")
    args, rest = parser.parse_known_args()

    from vlgen.cli import build_cli

    cli_args = [a for c in args.config for a in ("--config", c)] + rest
    cli = build_cli(cli_args)
    model, data = cli.model, cli.datamodule
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    data.prepare_data()
    data.setup("fit")
    if hasattr(data, "set_transforms"):
        data.set_transforms(model.image_transform(True), model.image_transform(False))
        data.setup("fit")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batches = iter(data.train_dataloader())

    precision = str(cli.config["trainer"].get("precision") or "32")
    choice = args.autocast if args.autocast != "config" else {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice or "none", torch.float32)

    def step() -> int:
        batch = next(batches)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(batch["captions"])

    model.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, samples = time.perf_counter(), 0
    for _ in range(args.steps):
        samples += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (CUDA allocator)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (process peak RSS)"
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops, per_step = counter.get_total_flops(), elapsed / args.steps
    trainable = sum(p.numel() for p in params)
    print(f"config: {' + '.join(args.config)}  device: {device}  threads: {torch.get_num_threads()}")
    print(f"trainable parameters: {trainable:,}  computing in: {str(compute).replace('torch.', '')}")
    print(f"train step: {samples / elapsed:.2f} samples/s ({per_step:.3f} s/step over {args.steps} steps)")
    print(f"peak memory: {peak}")
    if device.type == "cpu":
        peak_flops = matmul_peak(compute)
        print(
            f"FLOPs per step: {flops / 1e9:.1f} G; {flops / per_step / 1e9:.1f} GFLOP/s = MFU "
            f"{flops / per_step / peak_flops:.1%}"
            f" of this machine's {str(compute).replace('torch.', '')} matmul peak ({peak_flops / 1e9:.0f} GFLOP/s)"
        )


if __name__ == "__main__":
    sys.exit(main())
