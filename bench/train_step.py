"""Training-step throughput and peak memory for any vlgen config.

    python bench/train_step.py --config configs/tiny/linear.yaml [--steps 10] [--warmup 2]

Builds the model and data exactly as ``vlgen fit`` would (same config parsing), then times forward + backward +
optimiser step on real batches from the train loader. Prints samples/s and peak memory (CUDA allocator peak on GPU,
process peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
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

    def step() -> int:
        batch = next(batches)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
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
    trainable = sum(p.numel() for p in params)
    print(f"config: {' + '.join(args.config)}  device: {device}  threads: {torch.get_num_threads()}")
    print(f"trainable parameters: {trainable:,}")
    print(f"train step: {samples / elapsed:.2f} samples/s ({elapsed / args.steps:.3f} s/step over {args.steps} steps)")
    print(f"peak memory: {peak}")


if __name__ == "__main__":
    sys.exit(main())
