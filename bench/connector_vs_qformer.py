"""EVLGen's token-merging connector vs BLIP-2's Q-Former at the same width and depth, as bridges.

    python bench/connector_vs_qformer.py [--tokens 257] [--vision-dim 1408] [--width 768] [--layers 12]
                                         [--heads 12] [--queries 32] [--r 19] [--llm-dim 2560] [--batch 8]
                                         [--steps 5] [--device cpu|cuda]

Defaults are the papers': EVA ViT-g's 257 tokens of width 1408 in, BERT-base width and depth, 32 queries with
cross-attention every other layer for the Q-Former, r = 19 merges per layer for the connector, OPT-2.7B's width
out. Both start from the same random BERT (saved to a temp dir and loaded as a checkpoint, as users do). Prints
tokens in/out, forward and forward+backward FLOPs (torch.utils.flop_counter) and the measured forward+backward
time of each, and the connector/Q-Former ratios. The LLM is not part of this comparison; fewer prompts also make
its own cost smaller (see bench/train_step.py for whole training steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def bert_dir(out: Path, width: int, layers: int, heads: int) -> str:
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=512,
    )  # fmt: skip
    transformers.BertForMaskedLM(config).save_pretrained(out)
    return str(out)


def measure(bridge: torch.nn.Module, tokens: torch.Tensor, steps: int) -> dict[str, float]:
    bridge.train()
    with FlopCounterMode(display=False) as fwd:
        out = bridge(tokens).prompts
    with FlopCounterMode(display=False) as both:
        bridge(tokens).prompts.float().pow(2).mean().backward()
    times = []
    for _ in range(steps + 1):
        if tokens.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        bridge(tokens).prompts.float().pow(2).mean().backward()
        if tokens.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "tokens_out": out.shape[1],
        "fwd_gflops": fwd.get_total_flops() / 1e9,
        "fwd_bwd_gflops": both.get_total_flops() / 1e9,
        "fwd_bwd_ms": 1000 * statistics.median(times[1:]),  # the first call warms up
        "params_m": sum(p.numel() for p in bridge.parameters() if p.requires_grad) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("tokens", 257), ("vision-dim", 1408), ("width", 768), ("layers", 12), ("heads", 12)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("queries", 32), ("r", 19), ("llm-dim", 2560), ("batch", 8), ("steps", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from vlgen.bridges import QFormer, TokenMergingConnector

    torch.manual_seed(0)
    tokens = torch.randn(args.batch, args.tokens, args.vision_dim, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        bert = bert_dir(Path(tmp), args.width, args.layers, args.heads)
        bridges = {
            "Q-Former": QFormer(bert, num_queries=args.queries, cross_attention_frequency=2),
            "connector": TokenMergingConnector(bert, num_layers=args.layers, r=args.r),
        }
    results = {}
    for name, bridge in bridges.items():
        bridge.build(args.vision_dim, args.llm_dim)
        results[name] = measure(bridge.to(args.device), tokens, args.steps)

    print(f"device {args.device}, batch {args.batch}, {args.tokens} tokens of width {args.vision_dim} in, ")
    print(f"width {args.width}, {args.layers} layers; Q-Former {args.queries} queries; connector r = {args.r}")
    head = ("tokens", 11), ("trainable M", 11), ("fwd GFLOP", 10), ("fwd+bwd GFLOP", 14), ("fwd+bwd ms", 11)
    print(f"{'':10s} " + " ".join(f"{title:>{width}s}" for title, width in head))
    for name, m in results.items():
        print(
            f"{name:10s} {args.tokens:>4d} -> {m['tokens_out']:<4d} {m['params_m']:11.1f} {m['fwd_gflops']:10.1f} "
            f"{m['fwd_bwd_gflops']:14.1f} {m['fwd_bwd_ms']:11.1f}"
        )
    c, q = results["connector"], results["Q-Former"]
    print(
        f"connector / Q-Former: FLOPs {c['fwd_bwd_gflops'] / q['fwd_bwd_gflops']:.2f}x, "
        f"time {c['fwd_bwd_ms'] / q['fwd_bwd_ms']:.2f}x"
    )


if __name__ == "__main__":
    main()
