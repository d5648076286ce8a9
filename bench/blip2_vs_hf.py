"""vlgen vs Hugging Face BLIP-2 at the same dimensions: stage-2 training step and batched generation.

    python bench/blip2_vs_hf.py [--batch 16] [--steps 6] [--warmup 2] [--device cpu|cuda]

One random ``Blip2ForConditionalGeneration`` is written to a temp dir (ViT 224 px / patch 14 -> 257 tokens,
a 6-layer Q-Former of width 384 with 32 queries, and a Llama with SmolLM2-135M's dimensions: 30 layers, width 576,
vocab 49152); vlgen imports it with ``load_hf_blip2`` so both sides run the same weights. Each side runs in its own
subprocess (clean peak memory): a training step with the vision tower and LLM frozen (forward, backward, AdamW
over the Q-Former, queries and projection) on the same captions, then greedy and beam-5 generation of exactly
``--new-tokens`` tokens. Prints samples/s per side, the vlgen/HF ratios and peak memory (CUDA allocator peak on
GPU, process peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = "a photo of red green blue yellow circle square triangle left right above below small large the and is".split()
PROMPT = "a photo of"
CAPTIONS = [
    "a small red circle to the left of a large blue square",
    "a green triangle above a yellow circle",
    "a large blue square",
    "the red triangle is below a small green square and a blue circle",
]
QUERIES = 32


def build(out: Path) -> None:
    """Write the random BLIP-2 and a word-level tokenizer with a 49152-token vocabulary."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + WORDS + [f"w{i}" for i in range(49152 - len(specials) - len(WORDS) - 1)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(out)
    llm = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    width = dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6)
    config = transformers.Blip2Config(
        vision_config=dict(**width, num_hidden_layers=6, image_size=224, patch_size=14),
        qformer_config=dict(**width, num_hidden_layers=6, cross_attention_frequency=2, encoder_hidden_size=384),
        text_config=llm.to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(out)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_side(side: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    import transformers

    torch.manual_seed(0)
    device = args.device
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    if side == "vlgen":
        from vlgen.interop import load_hf_blip2
        from vlgen.llms import Decoding

        model = load_hf_blip2(str(path), prompt=PROMPT).to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]

        def loss() -> torch.Tensor:
            out = model(pixels)
            return model.llm.loss(out.prompts, out.mask, [PROMPT] * len(captions), captions)

        def generate(beams: int) -> None:
            model.llm.decoding = Decoding(num_beams=beams, **gen)
            model.caption(pixels)

    else:
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(path).to(device)
        for part in (model.vision_model, model.language_model):
            part.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        tok = transformers.AutoTokenizer.from_pretrained(path)
        image = [model.config.image_token_index] * QUERIES
        prefix = tok(PROMPT).input_ids
        rows, labels = [], []
        for caption in captions:  # what the processor gives: <image> x 32, the prompt, then the caption and </s>
            target = [*tok(caption, add_special_tokens=False).input_ids, tok.eos_token_id]
            rows.append(image + prefix + target)
            labels.append([-100] * (QUERIES + len(prefix)) + target)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device)
        prompt_ids = torch.tensor([image + prefix] * args.batch, device=device)

        def loss() -> torch.Tensor:
            return model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=label_t).loss

        def generate(beams: int) -> None:
            with torch.no_grad():
                model.generate(pixel_values=pixels, input_ids=prompt_ids, num_beams=beams, **gen)

    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-5)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    out = {"train_s": timed(train_step, args.steps, args.warmup, device)}
    print(f"{side}: training step {out['train_s']:.2f} s", file=sys.stderr, flush=True)
    model.eval()
    out["greedy_s"] = timed(lambda: generate(1), args.gen_steps, 1, device)
    print(f"{side}: greedy generation {out['greedy_s']:.2f} s", file=sys.stderr, flush=True)
    out["beam5_s"] = timed(lambda: generate(5), args.gen_steps, 1, device)
    print(f"{side}: beam-5 generation {out['beam5_s']:.2f} s", file=sys.stderr, flush=True)
    out["peak_mb"] = peak_memory_mb(device)
    out["trainable"] = sum(p.numel() for p in trainable)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-steps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--side", choices=["vlgen", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.dir, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        results = {}
        for side in ("hf", "vlgen"):
            cmd = [sys.executable, __file__, "--side", side, "--dir", tmp, *sys.argv[1:]]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress goes to stderr
            if proc.returncode != 0:
                sys.exit(f"{side} failed (exit {proc.returncode})")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    hf, ours = results["hf"], results["vlgen"]
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, {args.new_tokens} new tokens")
    print(f"trainable parameters: hf {hf['trainable']:,}  vlgen {ours['trainable']:,}")
    print(f"{'':24s} {'HF samples/s':>13s} {'vlgen samples/s':>16s} {'vlgen / HF':>11s}")
    for key, name in (
        ("train_s", "stage-2 training step"),
        ("greedy_s", "greedy generation"),
        ("beam5_s", "beam-5 generation"),
    ):
        a, b = args.batch / hf[key], args.batch / ours[key]
        print(f"{name:24s} {a:13.2f} {b:16.2f} {b / a:10.2f}x")
    print(f"peak memory (MiB): hf {hf['peak_mb']:.0f}  vlgen {ours['peak_mb']:.0f}")


if __name__ == "__main__":
    main()
