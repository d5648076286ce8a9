"""Half-precision frozen parts. Under ``precision: bf16-mixed`` (Lightning's autocast) each frozen part held in half
precision computes in its own dtype and hands on tensors in the autocast dtype, while the bridge trains float32
weights with float32 gradients; a model cast whole to bf16 (DeepSpeed's bf16 mode, ``bf16-true``) runs every
model class's training step; a Lightning ``bf16-mixed`` fit leaves the frozen parts as they were and saves float32
lean checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from vlgen.bridges import MLPProjector, PFormer, QFormer, TokenMergingConnector
from vlgen.encoders import TimmEncoder
from vlgen.llms import CausalLM, Seq2SeqLM
from vlgen.llms.decoding import Decoding
from vlgen.models import Blip2Stage1, Captioner, PFormerStage0
from vlgen.models.base import Optim

VIT = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 32, "num_heads": 2}
CAPTIONS = ["a red circle", "a blue square left", "two small triangles"]


def encoder(dtype: str = "float32") -> TimmEncoder:
    return TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, init_seed=0, dtype=dtype)


def captioner(llm_dir, encoder_dtype: str = "float32", llm_dtype: str = "float32", bridge=None) -> Captioner:
    torch.manual_seed(0)
    llm = CausalLM(str(llm_dir), dtype=llm_dtype, decoding=Decoding(max_new_tokens=2))
    model = Captioner(encoder(encoder_dtype), bridge or MLPProjector(), llm, optim=Optim(lr=1e-2, warmup_steps=0))
    model.log = lambda *a, **k: None  # no trainer attached
    return model


def batch(dtype: torch.dtype = torch.float32) -> dict:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    return {"pixels": pixels, "captions": CAPTIONS, "references": [[c] for c in CAPTIONS], "ids": ["0", "1", "2"],
            "num_skipped": 0}  # fmt: skip


def output_dtypes(modules: dict[str, torch.nn.Module]) -> dict[str, torch.dtype]:
    """Hook each module and record the dtype of the (first) tensor it returns."""
    seen: dict[str, torch.dtype] = {}

    def hook(name):
        def record(_module, _args, out):
            if hasattr(out, "prompts"):  # a bridge's BridgeOutput
                out = out.prompts
            tensor = out if torch.is_tensor(out) else next(t for t in out if torch.is_tensor(t))
            seen[name] = tensor.dtype

        return record

    for name, module in modules.items():
        module.register_forward_hook(hook(name))
    return seen


def frozen_and_trainable(model: torch.nn.Module) -> tuple[dict, dict]:
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def test_under_bf16_autocast_each_frozen_part_computes_in_its_own_dtype(tiny_llm_dir):
    model = captioner(tiny_llm_dir, encoder_dtype="float16", llm_dtype="bfloat16").train()
    watched = {"vit block": model.encoder.model.blocks[0], "encoder": model.encoder, "bridge": model.bridge}
    seen = output_dtypes({**watched, "llm layer": model.llm.model.model.layers[0]})
    frozen, trainable = frozen_and_trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(batch(), 0)
    loss.backward()
    # The float16 ViT ran in float16 (not re-cast to bf16 at every matmul) and handed bf16 tokens on; the bf16 LLM
    # ran in bf16; the trainable bridge ran under the trainer's autocast.
    assert seen == {"vit block": torch.float16, "encoder": torch.bfloat16, "bridge": torch.bfloat16,
                    "llm layer": torch.bfloat16}  # fmt: skip
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    for name, p in trainable.items():  # float32 master weights with float32 gradients
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and p.dtype == frozen[name].dtype and torch.equal(p, frozen[name]), name
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float16}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}


def test_the_bf16_mixed_loss_is_the_float32_loss_within_bf16_rounding(tiny_llm_dir):
    full = captioner(tiny_llm_dir).train()
    half = captioner(tiny_llm_dir, encoder_dtype="float16", llm_dtype="bfloat16").train()
    half.bridge.load_state_dict(full.bridge.state_dict())
    torch.manual_seed(1)
    reference = full.training_step(batch(), 0).item()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = half.training_step(batch(), 0).item()
    assert abs(mixed - reference) < 0.02 * reference, (mixed, reference)
    assert mixed != reference  # the run really was in half precision, not silently float32


def stage1(bert_dir, _llm_dir) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = Blip2Stage1(encoder(), QFormer(str(bert_dir), num_queries=4, text_input=True), embed_dim=8)
    return model, batch()


def stage0(bert_dir, llm_dir) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    llm = CausalLM(str(llm_dir), decoding=Decoding(max_new_tokens=2))
    return PFormerStage0(PFormer(str(bert_dir), num_prompts=3), llm, embed_dim=8), {"text": CAPTIONS, "num_skipped": 0}


def qformer_causal(bert_dir, llm_dir) -> tuple[torch.nn.Module, dict]:
    return captioner(llm_dir, bridge=QFormer(str(bert_dir), num_queries=4)), batch()


def connector_seq2seq(bert_dir, t5_dir) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    llm = Seq2SeqLM(str(t5_dir), decoding=Decoding(max_new_tokens=2))
    return Captioner(encoder(), TokenMergingConnector(str(bert_dir), num_layers=2, r=1), llm), batch()


@pytest.mark.parametrize("build", [stage1, stage0, qformer_causal, connector_seq2seq], ids=lambda f: f.__name__)
def test_a_model_cast_whole_to_bf16_runs_its_training_step(build, tiny_bert_dir, tiny_llm_dir, tiny_t5_dir):
    """What DeepSpeed's bf16 mode (and ``bf16-true``) does to a model: every weight and every float input in bf16,
    no autocast. No part may assume float32 tensors or the dtype its config named."""
    model, data = build(tiny_bert_dir, tiny_t5_dir if build is connector_seq2seq else tiny_llm_dir)
    model.log = lambda *a, **k: None
    model.to(torch.bfloat16).train()
    data = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in data.items()}
    loss = model.training_step(data, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    assert sum(g.float().abs().sum() for g in grads) > 0


def test_a_lightning_bf16_mixed_fit_keeps_the_frozen_parts_and_saves_float32_trainable_weights(tiny_llm_dir, tmp_path):
    model = captioner(tiny_llm_dir, encoder_dtype="float16", llm_dtype="bfloat16")
    del model.log  # the trainer logs
    frozen, _ = frozen_and_trainable(model)
    bridge_before = {n: p.detach().clone() for n, p in model.bridge.named_parameters()}
    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch()] * 3, batch_size=None))
    for name, p in model.named_parameters():
        if name in frozen:  # not cast by the precision plugin, not moved by the optimiser
            assert p.dtype == frozen[name].dtype and torch.equal(p, frozen[name]), name
    assert all(p.dtype == torch.float32 for p in model.bridge.parameters())
    assert any(not torch.equal(p, bridge_before[n]) for n, p in model.bridge.named_parameters())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {f"bridge.{n}" for n in bridge_before}  # lean: the trainable weights only
    assert {t.dtype for t in saved.values()} == {torch.float32}
