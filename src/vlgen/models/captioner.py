"""The captioning LightningModule: encoder -> bridge -> frozen LLM.

It knows the three interfaces, not their implementations, so a new bridge or encoder is a YAML change. Training
minimises the LM loss on caption tokens plus whatever auxiliary losses the bridge returns (each logged), plus an
optional P-Former prompt alignment (:class:`~vlgen.models.PromptAlignment`, logged as ``train/align``). Validation
and test generate captions and score them with :class:`~vlgen.metrics.CaptionMetrics`; test also writes
``metrics.json`` and ``predictions.jsonl`` into the run's log directory; predict writes ``{"id", "caption"}`` lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vlgen.dist import gather_objects
from vlgen.interfaces import Bridge, BridgeOutput, CaptionBatch, LanguageModel, VisualEncoder
from vlgen.metrics import CaptionMetrics
from vlgen.models.alignment import PromptAlignment, bridge_prompt_count
from vlgen.models.base import Optim, VLModule

log = logging.getLogger(__name__)


class Captioner(VLModule):
    """Image or video captioning with a frozen LLM.

    Args:
        encoder: the visual encoder (frozen unless its config says otherwise).
        bridge: visual tokens -> LLM prompts; its widths are derived from the encoder and the LLM.
        llm: the language model (frozen unless its config says otherwise).
        prompt: text placed after the visual prompts, before the caption (BLIP-2 uses "a photo of").
        optim: optimiser and schedule.
        num_logged_samples: images kept from the first validation batch for caption tables (W&B).
        alignment: pull the bridge's prompts towards a frozen P-Former's prompts of the caption (its prompt count
            must equal the bridge's; checked here).
        init_from: a vlgen checkpoint whose saved weights initialise this model before training, e.g. an image
            model's to fine-tune it on video; weights it lacks (new temporal modules) keep their initialisation.
    """

    def __init__(
        self,
        encoder: VisualEncoder,
        bridge: Bridge,
        llm: LanguageModel,
        prompt: str = "a photo of",
        optim: Optim | None = None,
        num_logged_samples: int = 8,
        alignment: PromptAlignment | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optim)
        self.encoder = encoder
        self.bridge = bridge
        self.llm = llm
        self.bridge.build(encoder.embed_dim, llm.hidden_size)
        self.alignment = alignment
        self._alignment_waits = False  # logged once: prompts and teacher disagree in count during a merge ramp
        if alignment is not None:
            alignment.build(bridge_prompt_count(encoder, bridge), llm.hidden_size)
        self.prompt = prompt
        self.num_logged_samples = num_logged_samples
        self.val_metrics = CaptionMetrics()
        self.test_metrics = CaptionMetrics()
        self.logged_samples: list[dict[str, Any]] = []
        self._outputs: list[dict[str, Any]] = []
        if init_from is not None:
            self.init_weights_from(init_from, "model.init_from")
        self.log_parameter_counts()

    def image_transform(self, train: bool) -> Any:
        """The transform the data module applies to each PIL image (the encoder's own)."""
        return self.encoder.image_transform(train)

    def forward(self, pixels: Tensor) -> BridgeOutput:
        tokens = self.encoder(pixels)  # [B, N, Dv] (video encoders fold time in)
        return self.bridge(tokens)  # prompts [B, M, Dllm]

    def caption(self, pixels: Tensor) -> list[str]:
        """Generate one caption per image (or video)."""
        out = self(pixels)
        return self.llm.generate(out.prompts, out.mask, [self.prompt] * len(pixels))

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: CaptionBatch, batch_idx: int) -> Tensor | None:
        if self.count_skipped(batch):
            return None
        out = self(batch["pixels"])
        out.losses.update(self.bridge.text_losses(out, batch["captions"]))
        if self.alignment is not None:  # already weighted; summed and logged with the bridge's own losses
            if out.prompts.shape[1] == self.alignment.num_prompts:
                out.losses["align"] = self.alignment.loss(out.prompts, batch["captions"], out.mask)
            elif not self._alignment_waits:  # checked at build: only a merge ramp under way gets here
                self._alignment_waits = True
                log.info(
                    "alignment: the bridge gives %d prompts, not the P-Former's %d, while its merging ramps up; "
                    "alignment applies from the step they agree",
                    out.prompts.shape[1], self.alignment.num_prompts,
                )  # fmt: skip
        lm_loss = self.llm.loss(out.prompts, out.mask, [self.prompt] * len(batch["captions"]), batch["captions"])
        loss = lm_loss + sum(out.losses.values(), torch.zeros((), device=lm_loss.device))
        size = len(batch["captions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lm_loss", lm_loss, batch_size=size)
        for name, value in out.losses.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def on_train_epoch_end(self) -> None:
        self.report_skipped("train")

    # --- evaluation -----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: CaptionBatch, metrics: CaptionMetrics) -> list[str]:
        if self.count_skipped(batch):
            return []
        preds = self.caption(batch["pixels"])
        metrics.update(preds, batch["references"], ids=batch["ids"])
        return preds

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        preds = self._evaluate(batch, self.val_metrics)
        if batch_idx == 0 and preds:
            k = self.num_logged_samples
            self.logged_samples = [
                {"pixels": p.detach().cpu(), "caption": c, "references": r, "id": i}
                for p, c, r, i in zip(batch["pixels"][:k], preds[:k], batch["references"][:k], batch["ids"][:k])
            ]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        self.report_skipped("val")

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        preds = self._evaluate(batch, self.test_metrics)
        for i, caption, refs in zip(batch["ids"], preds, batch["references"], strict=True):
            self._outputs.append({"id": i, "caption": caption, "references": refs})

    def on_test_epoch_end(self) -> None:
        scores = self._log_metrics("test", self.test_metrics)
        self.report_skipped("test")
        rows = _unique_by_id(gather_objects(self._outputs))
        self._outputs = []
        out_dir = self._run_dir()  # every rank asks: trainer.log_dir is a collective call under DDP
        if self.trainer.is_global_zero:
            (out_dir / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
            _write_jsonl(out_dir / "predictions.jsonl", rows)
            rank_zero_info(f"test metrics: {out_dir / 'metrics.json'}  predictions: {out_dir / 'predictions.jsonl'}")

    def predict_step(self, batch: CaptionBatch, batch_idx: int) -> list[dict[str, str]]:
        if self.count_skipped(batch):
            return []
        rows = [{"id": i, "caption": c} for i, c in zip(batch["ids"], self.caption(batch["pixels"]), strict=True)]
        self._outputs.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        rows = _unique_by_id(gather_objects(self._outputs))
        self._outputs = []
        out_dir = self._run_dir()
        if self.trainer.is_global_zero:
            _write_jsonl(out_dir / "predictions.jsonl", rows)
            rank_zero_info(f"predictions: {out_dir / 'predictions.jsonl'} ({len(rows)} captions)")

    def _run_dir(self) -> Path:
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    def _log_metrics(self, stage: str, metrics: CaptionMetrics) -> dict[str, float]:
        if metrics.is_empty() or self.trainer.sanity_checking:
            metrics.reset()  # the sanity check only proves the loop runs; its scores mean nothing
            return {}
        scores = {f"{stage}/{k}": float(v) for k, v in metrics.compute().items()}
        metrics.reset()
        self.log_dict(scores)  # identical on every rank: compute() already gathered all samples
        if stage == "test" or self.trainer.is_global_zero:
            rank_zero_info(f"{stage}: " + "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scores.items()))
        return {k.split("/", 1)[1]: v for k, v in scores.items()}


def _unique_by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A DistributedSampler pads the last batch with repeats; keep each id once, in order.
    seen: set[str] = set()
    out = []
    for row in rows:
        if row["id"] not in seen:
            seen.add(row["id"])
            out.append(row)
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
