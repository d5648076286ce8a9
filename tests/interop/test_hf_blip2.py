"""Hugging Face BLIP-2 interop: import parity (logits, loss, generation), export round trip, ``vlgen convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AddedToken, Blip2Config, Blip2ForConditionalGeneration

from vlgen.interop import export_hf_blip2, load_hf_blip2
from vlgen.llms import Decoding

WORDS = "a photo of red green blue circle square triangle left right above below small large the and is".split()
QUERIES, PROMPT = 4, "a photo of"
CAPTIONS = ["a red circle", "the small blue square above a large green triangle"]


def build_tokenizer(out: Path, t5: bool) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer shaped like OPT's (``<s>`` opens every text) or T5's (``</s>`` closes it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"] if t5 else ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    edge = ("</s>", vocab["</s>"]) if t5 else ("<s>", vocab["<s>"])
    template = "$A </s>" if t5 else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[edge])
    extra = {} if t5 else {"bos_token": "<s>"}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", **extra
    )
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(out)
    return tok


def text_config(tok, t5: bool) -> transformers.PretrainedConfig:
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if t5:
        return transformers.T5Config(
            vocab_size=len(tok), d_model=24, d_kv=12, d_ff=48, num_layers=2, num_heads=2, **ids,
            decoder_start_token_id=tok.pad_token_id,
        )  # fmt: skip
    return transformers.OPTConfig(
        vocab_size=len(tok), hidden_size=24, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=24, max_position_embeddings=64, bos_token_id=tok.bos_token_id, **ids,
    )  # fmt: skip


def build_blip2(out: Path, t5: bool) -> Path:
    """A random ``Blip2ForConditionalGeneration`` (2-layer ViT at 32 px, 2-layer Q-Former, 4 queries) + tokenizer."""
    tok = build_tokenizer(out, t5)
    width = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(**width, image_size=32, patch_size=8),
        qformer_config=dict(
            **width, cross_attention_frequency=1 if t5 else 2, vocab_size=40, max_position_embeddings=32
        ),
        text_config=text_config(tok, t5).to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises the vision tower near zero and the queries at zero: make them matter
        for name, p in model.named_parameters():
            std = 0.5 if name.startswith("language") else 0.6 if name.startswith(("qformer", "query")) else 0.2
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm_scale else std * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["opt", "t5"])
def blip2_dir(request, tmp_path_factory) -> Path:
    return build_blip2(tmp_path_factory.mktemp(f"blip2-{request.param}"), t5=request.param == "t5")


def is_t5(path: Path) -> bool:
    return not Blip2Config.from_pretrained(path).use_decoder_only_language_model


@pytest.fixture(scope="module")
def hf(blip2_dir) -> Blip2ForConditionalGeneration:
    return Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()


@pytest.fixture(scope="module")
def ours(blip2_dir):
    return load_hf_blip2(str(blip2_dir), prompt=PROMPT, decoding=Decoding(max_new_tokens=8)).eval()


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def hf_batch(path: Path, captions: list[str] = CAPTIONS) -> dict[str, torch.Tensor]:
    """Hugging Face's inputs, written out by hand: ``<image>`` x queries, the prompt as the tokenizer encodes it,
    then (decoder-only) the caption and ``</s>`` in the same sequence, or (T5) the caption and ``</s>`` as labels."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    image = [tok.convert_tokens_to_ids("<image>")] * QUERIES
    prefix = tok(PROMPT).input_ids
    targets = [[*tok(c, add_special_tokens=False).input_ids, tok.eos_token_id] for c in captions]
    if is_t5(path):
        rows, labels = [image + prefix] * len(captions), targets
    else:
        rows = [image + prefix + t for t in targets]
        labels = [[-100] * (QUERIES + len(prefix)) + t for t in targets]

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    ids = pad(rows, tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": pad([[1] * len(r) for r in rows], 0), "labels": pad(labels, -100)}


def our_logits(model, path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the imported LLM given the imported encoder + Q-Former's prompts and the same text."""
    prompts = model(pixels()).prompts  # [B, Q, D]
    text = model.llm.model.get_input_embeddings()(batch["input_ids"][:, QUERIES:])
    embeds = torch.cat([prompts, text], dim=1)
    if is_t5(path):
        return model.llm.model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).logits
    return model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def test_import_matches_hugging_face_logits_and_loss(blip2_dir, hf, ours):
    batch = hf_batch(blip2_dir)
    expected = hf(pixel_values=pixels(), **batch)
    logits = our_logits(ours, blip2_dir, batch)
    real = batch["labels"] != -100  # the caption positions (decoder positions for T5)
    if not is_t5(blip2_dir):
        real = real[:, 1:]  # position t predicts token t + 1
        logits, hf_logits = logits[:, :-1][real], expected.logits[:, :-1][real]
    else:
        logits, hf_logits = logits[real], expected.logits[real]
    assert real.sum() >= 8
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=1e-4)
    out = ours(pixels())
    loss = ours.llm.loss(out.prompts, out.mask, [PROMPT] * 2, CAPTIONS)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_import_generates_what_hugging_face_generates(blip2_dir, hf, ours):
    tok = transformers.AutoTokenizer.from_pretrained(blip2_dir)
    ids = torch.tensor([[tok.convert_tokens_to_ids("<image>")] * QUERIES + tok(PROMPT).input_ids] * 2)
    kwargs = {**ours.llm.decoding.kwargs(), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    generated = hf.generate(pixel_values=pixels(), input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    if not is_t5(blip2_dir):
        generated = generated[:, ids.shape[1] :]  # decoder-only generate returns the prompt too
    expected = [t.strip() for t in tok.batch_decode(generated, skip_special_tokens=True)]
    captions = ours.caption(pixels())
    assert captions == expected and any(captions)


def test_frozen_parts_and_trainable_bridge(ours):
    assert not any(p.requires_grad for p in ours.encoder.parameters())
    assert not any(p.requires_grad for p in ours.llm.parameters())
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {"bridge.query_tokens", "bridge.ln_vision.weight", "bridge.language_projection.weight"} <= trainable
    assert all(n.startswith("bridge.") for n in trainable)


@torch.no_grad()
def test_export_round_trip_gives_identical_logits(blip2_dir, hf, ours, tmp_path):
    from PIL import Image

    out = export_hf_blip2(ours, tmp_path / "exported")
    again = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    batch = hf_batch(blip2_dir)
    torch.testing.assert_close(
        again(pixel_values=pixels(), **batch).logits, hf(pixel_values=pixels(), **batch).logits, rtol=0, atol=1e-6
    )
    processor = transformers.Blip2Processor.from_pretrained(out)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    encoded = processor(images=image, text=PROMPT, return_tensors="pt")
    assert (
        encoded["input_ids"][0].tolist()
        == batch["input_ids"][0, : QUERIES + len(processor.tokenizer(PROMPT).input_ids)].tolist()
    )
    torch.testing.assert_close(encoded["pixel_values"][0], ours.image_transform(False)(image), rtol=0, atol=1e-5)


def test_convert_both_ways_through_the_cli(blip2_dir, hf, ours, tmp_path, monkeypatch):
    from vlgen.cli import main
    from vlgen.interop.convert import build_model

    main(["convert", "hf-blip2", str(blip2_dir), str(tmp_path / "blip2.ckpt"), "--prompt", PROMPT])
    ckpt = torch.load(tmp_path / "blip2.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("bridge.") for k in ckpt["state_dict"])  # frozen parts stay out
    rebuilt = build_model([str(tmp_path / "blip2.yaml")]).eval()
    assert type(rebuilt.llm) is type(ours.llm) and rebuilt.prompt == PROMPT
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels()).prompts, ours(pixels()).prompts, rtol=0, atol=0)

    # The checkpoint, not the directory it came from, gives the exported trainable weights.
    ckpt["state_dict"]["bridge.language_projection.bias"] += 1.0
    torch.save(ckpt, tmp_path / "changed.ckpt")
    out = tmp_path / "hf"
    main(["convert", "to-hf-blip2", str(tmp_path / "changed.ckpt"), str(out), "--config", str(tmp_path / "blip2.yaml")])
    exported = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(exported.language_projection.bias, hf.language_projection.bias + 1.0)
    torch.testing.assert_close(exported.qformer.layernorm.weight, hf.qformer.layernorm.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_vlgen_test_runs_on_a_converted_checkpoint(blip2_dir, tmp_path, monkeypatch):
    import json

    import yaml

    from vlgen.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["vlgen"])  # LightningCLI warns when sys.argv holds pytest's arguments
    main(["convert", "hf-blip2", str(blip2_dir), "blip2.ckpt"])
    world = {"seed": 0, "num_train": 2, "num_val": 2, "num_test": 4, "image_size": 32, "num_text": 0}
    data = {
        "trainer": {"accelerator": "cpu", "devices": 1},
        "data": {
            "class_path": "vlgen.data.ImageTextDataModule",
            "init_args": {
                "root": "shapes",
                "batch_size": 2,
                "num_workers": 0,
                "generate": {"class_path": "vlgen.data.synthetic.ShapesWorld", "init_args": world},
            },
        },
    }
    Path("data.yaml").write_text(yaml.safe_dump(data))
    main(["test", "--config", "blip2.yaml", "--config", "data.yaml", "--ckpt_path", "blip2.ckpt"])
    run = next(Path("runs").rglob("predictions.jsonl"))
    rows = [json.loads(line) for line in run.read_text().splitlines()]
    assert len(rows) == 4 and all("caption" in r for r in rows)
    assert "CIDEr" in json.loads((run.parent / "metrics.json").read_text())


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory) -> Path:
    return build_blip2(tmp_path_factory.mktemp("blip2-opt-only"), t5=False)


def timm_captioner(bert_dir: Path, llm_dir: Path, final_norm: bool, vision_norm: bool, lora: Any = None):
    """A timm ViT -> Q-Former -> OPT captioner; ``lora`` (a :class:`~vlgen.lora.LoRA`) adapts the ViT and the LLM."""
    from vlgen.bridges import QFormer
    from vlgen.encoders import TimmEncoder
    from vlgen.llms import CausalLM
    from vlgen.models import Captioner

    torch.manual_seed(0)
    vit = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    encoder = TimmEncoder("vit_tiny_patch16_224", model_kwargs=vit, final_norm=final_norm, lora=lora)
    bridge = QFormer(str(bert_dir), num_queries=QUERIES, vision_norm=vision_norm)
    return Captioner(encoder, bridge, CausalLM(str(llm_dir), lora=lora), prompt=PROMPT).eval()


@torch.no_grad()
def test_export_of_a_timm_vit_gives_identical_logits(tiny_bert_dir, opt_dir, tmp_path):
    model = timm_captioner(tiny_bert_dir, opt_dir, final_norm=True, vision_norm=False)
    with torch.no_grad():  # timm's zero biases and unit norms would hide a mapping mistake
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = Blip2ForConditionalGeneration.from_pretrained(export_hf_blip2(model, tmp_path / "vit")).eval()
    batch = hf_batch(opt_dir)
    expected = hf(pixel_values=pixels(), **batch).logits
    torch.testing.assert_close(our_logits(model, opt_dir, batch), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_export_merges_lora_adapters_of_the_vit_and_the_llm(tiny_bert_dir, opt_dir, tmp_path):
    from vlgen.lora import LoRA, has_lora

    model = timm_captioner(tiny_bert_dir, opt_dir, final_norm=True, vision_norm=False, lora=LoRA(r=2))
    assert has_lora(model.encoder.model) and has_lora(model.llm.model)
    for p in [*model.encoder.parameters(), *model.llm.parameters()]:
        if p.requires_grad:  # LoRA's B starts at zero: move the adapters so that they change the outputs
            p.add_(0.05 * torch.randn_like(p))
    hf = Blip2ForConditionalGeneration.from_pretrained(export_hf_blip2(model, tmp_path / "lora")).eval()
    batch = hf_batch(opt_dir)
    expected = hf(pixel_values=pixels(), **batch).logits
    torch.testing.assert_close(our_logits(model, opt_dir, batch), expected, rtol=1e-4, atol=1e-5)


def test_export_refuses_what_blip2_cannot_hold(tiny_bert_dir, opt_dir, tmp_path):
    from vlgen.errors import ConfigError

    model = timm_captioner(tiny_bert_dir, opt_dir, final_norm=True, vision_norm=True)
    with pytest.raises(ConfigError, match="exactly one LayerNorm"):
        export_hf_blip2(model, tmp_path / "two-norms")
    from vlgen.encoders import TimmEncoder

    model.encoder = TimmEncoder("test_resnet")  # a CNN: no blocks, no class token
    with pytest.raises(ConfigError, match="ResNet is not a plain square ViT"):
        export_hf_blip2(model, tmp_path / "cnn")
    model.encoder = torch.nn.Identity()
    with pytest.raises(ConfigError, match="HFBlip2Vision"):
        export_hf_blip2(model, tmp_path / "unknown")


def test_import_errors_name_the_problem(opt_dir, tiny_llm_dir, tmp_path):
    from vlgen.bridges import QFormer
    from vlgen.errors import ConfigError

    with pytest.raises(ConfigError, match="not a Hugging Face BLIP-2 directory"):
        load_hf_blip2(str(tiny_llm_dir))
    with pytest.raises(ConfigError, match=r"bridge\.num_queries is 32, but the BLIP-2 model has 4"):
        QFormer(str(opt_dir))
    with pytest.raises(ConfigError, match="Seq2SeqLM"):
        from vlgen.llms.seq2seq import Seq2SeqLM

        Seq2SeqLM(str(opt_dir))
