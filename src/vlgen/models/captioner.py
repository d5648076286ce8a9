"""The captioning LightningModule: encoder -> bridge -> frozen LLM.

It knows the three interfaces, not their implementations, so a new bridge or encoder is a YAML change. Training
minimises the LM loss on the target tokens (logged as ``train/lm_loss``) plus whatever auxiliary losses the bridge
returns and the listed objectives (:mod:`vlgen.objectives`: P-Former alignment, contrastive terms), each with its
weight, summed by :class:`~vlgen.models.VLModule`'s training step. The text between the visual prompts and the
target is ``prompt``, or, for a batch that carries per-sample text (``prompts``: a question, an instruction),
``prompt_template`` filled with it, so captioning, VQA and instruction data share this module. Validation and test
generate text and score it with :class:`~vlgen.metrics.CaptionMetrics`, or, when the data module has a ``task``
(:class:`~vlgen.data.VQATask`), with that task's metric and decoding settings; a VQA batch's weighted ``targets``
(each distinct answer with its share of the annotators) are trained on together. Test also writes ``metrics.json``
and ``predictions.jsonl`` into the run's log directory (and a task's official submission file); ``metrics.json``
also holds ``skipped``, the test samples that could not be read; ``gallery.html`` beside them shows the first
``gallery_size`` test samples with their pictures, texts and own scores (:mod:`vlgen.gallery`). Predict writes
``{"id", "caption"}`` lines and ``predict_summary.json`` (``{"predictions": n, "skipped": k}``) beside them. A test or
predict set whose samples were all unreadable stops with one line (:class:`~vlgen.errors.RunStopped`) and writes
neither file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from vlgen.dist import gather_objects, world_size
from vlgen.errors import ConfigError
from vlgen.gallery import Stats, module_normalisation, thumbnail_uri, write_gallery
from vlgen.interfaces import (
    Bridge,
    BridgeOutput,
    CaptionBatch,
    EvaluationTask,
    LanguageModel,
    ReadsText,
    ScoresSamples,
    VisualEncoder,
)
from vlgen.metrics import CaptionMetrics
from vlgen.models.base import Optim, VLModule
from vlgen.objectives import ModelParts, Objective

log = logging.getLogger(__name__)


class Captioner(VLModule):
    """Image or video captioning (and per-sample prompted generation, e.g. VQA) with a frozen LLM.

    Args:
        encoder: the visual encoder (frozen unless its config says otherwise).
        bridge: visual tokens -> LLM prompts; its widths are derived from the encoder and the LLM.
        llm: the language model (frozen unless its config says otherwise).
        prompt: text placed after the visual prompts, before the target, for samples without text of their own
            (BLIP-2 uses "a photo of").
        prompt_template: the text for a sample that carries its own (a batch's ``prompts``): ``{}`` is replaced by
            it, e.g. BLIP-2's VQA template ``"Question: {} Short answer:"``.
        optim: optimiser and schedule.
        num_logged_samples: images kept from the first validation batch for caption tables (W&B).
        objectives: auxiliary training objectives with their own weights (:mod:`vlgen.objectives`), e.g.
            :class:`~vlgen.objectives.PromptAlignment` or :class:`~vlgen.objectives.SentenceContrast`.
        init_from: a vlgen checkpoint whose saved weights initialise this model before training, e.g. an image
            model's to fine-tune it on video; weights it lacks (new temporal modules) keep their initialisation.
        bridge_reads_prompts: give the bridge each sample's own text too (the VQA question), as BLIP-2's VQA
            fine-tuning and InstructBLIP's instruction-aware Q-Former do; the bridge must read text
            (:class:`~vlgen.interfaces.ReadsText`: the Q-Former with ``text_input: true``).
        blank_images: replace every picture by a blank one (zeros), so nothing of the image reaches the LLM: the
            question-only (text-only) baseline, with the same LLM, prompts and trainable bridge.
        nonfinite: what a non-finite training loss or gradient does: ``stop`` the run (one line naming the step, the
            terms and the samples) or ``skip`` the step (:class:`~vlgen.models.VLModule`).
        gallery_size: test samples shown in ``gallery.html`` (the first ones, with a thumbnail each); 0 writes no
            gallery.
        activation_checkpointing: recompute the activations of the components' blocks in the backward instead of
            keeping them: ``true`` for all, or the components by name, e.g. ``[llm]`` (:class:`~vlgen.models.VLModule`).
    """

    def __init__(
        self,
        encoder: VisualEncoder,
        bridge: Bridge,
        llm: LanguageModel,
        prompt: str = "a photo of",
        prompt_template: str = "{}",
        optim: Optim | None = None,
        num_logged_samples: int = 8,
        objectives: list[Objective] | None = None,
        init_from: str | None = None,
        bridge_reads_prompts: bool = False,
        blank_images: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        gallery_size: int = 200,
        activation_checkpointing: bool | list[str] = False,
    ) -> None:
        super().__init__(optim, objectives, nonfinite, activation_checkpointing)
        if gallery_size < 0:
            raise ConfigError(f"model.gallery_size must be 0 (no gallery) or more, got {gallery_size}")
        if prompt_template.count("{}") != 1:
            raise ConfigError(f"model.prompt_template must hold exactly one {{}}, got {prompt_template!r}")
        if bridge_reads_prompts and not isinstance(bridge, ReadsText):
            raise ConfigError(
                f"model.bridge_reads_prompts: {type(bridge).__name__} cannot read text (the Q-Former can, built "
                "with text_input: true)"
            )
        self.bridge_reads_prompts, self.blank_images = bridge_reads_prompts, blank_images
        self.encoder = encoder
        self.bridge = bridge
        self.llm = llm
        self.bridge.build(encoder.embed_dim, llm.hidden_size)
        self.build_objectives(ModelParts(encoder, bridge, llm))
        self.prompt, self.prompt_template = prompt, prompt_template
        self.num_logged_samples = num_logged_samples
        self.gallery_size = gallery_size
        self._thumbnails: list[tuple[str, str | None]] = []  # (id, data URI or None) of this rank's gallery samples
        self._pixel_stats: Stats | None = None
        self._thumbnail_failed = False
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

    def forward(self, pixels: Tensor, texts: list[str] | None = None) -> BridgeOutput:
        """Prompts for ``pixels``; the bridge also reads ``texts`` (one per sample) with ``bridge_reads_prompts``."""
        if self.blank_images:
            pixels = torch.zeros_like(pixels)
        tokens = self.encoder(pixels)  # [B, N, Dv] (video encoders fold time in)
        if self.bridge_reads_prompts and texts is not None:
            return self.bridge.forward_with_text(tokens, None, texts)  # type: ignore[attr-defined]
        return self.bridge(tokens)  # prompts [B, M, Dllm]

    def setup(self, stage: str) -> None:
        task = self.task  # the data's own metric (VQA accuracy ...), else caption metrics
        make = task.make_metric if task is not None else CaptionMetrics
        self.val_metrics, self.test_metrics = make(), make()

    @property
    def task(self) -> EvaluationTask | None:
        """The attached data module's task (e.g. :class:`~vlgen.data.VQATask`), if it has one."""
        trainer = self._trainer
        module = getattr(trainer, "datamodule", None) if trainer is not None else None
        task = getattr(module, "task", None)
        return task if isinstance(task, EvaluationTask) else None

    def prefixes(self, size: int, prompts: list[str] | None = None) -> list[str]:
        """The text after the visual prompts for each of ``size`` samples: ``prompt_template`` filled with the
        sample's own text where there is one, else ``prompt``."""
        if prompts is None:
            return [self.prompt] * size
        return [self.prompt_template.format(p) for p in prompts]

    def caption(self, pixels: Tensor, prompts: list[str] | None = None, decoding: Any = None) -> list[str]:
        """Generate one text per image (or video), after each sample's own prompt text when given, with
        ``decoding`` (:class:`~vlgen.llms.Decoding`) in place of the LLM's own settings when given."""
        out = self(pixels, prompts)
        return self.llm.generate(out.prompts, out.mask, self.prefixes(len(pixels), prompts), decoding)

    # --- training -------------------------------------------------------------------------------------------------
    def training_losses(self, batch: CaptionBatch) -> dict[str, Tensor]:
        out = self(batch["pixels"], batch.get("prompts"))
        prefixes = self.prefixes(len(batch["captions"]), batch.get("prompts"))
        losses = {"lm_loss": self.lm_loss(out, prefixes, batch)}
        losses.update(out.losses)  # the bridge's own auxiliary terms (weight 1)
        losses.update(self.objective_losses(out, batch))
        return losses

    def lm_loss(self, out: BridgeOutput, prefixes: list[str], batch: CaptionBatch) -> Tensor:
        """The LM loss on each sample's target, or on every one of its weighted ``targets`` when the batch has them
        (the sample's prompts repeated for each)."""
        targets = batch.get("targets")
        if targets is None:
            return self.llm.loss(out.prompts, out.mask, prefixes, batch["captions"])
        counts = torch.tensor([len(t) for t in targets], device=out.prompts.device)
        rows = torch.repeat_interleave(torch.arange(len(targets), device=counts.device), counts)  # [sum(counts)]
        weights = torch.tensor([w for ws in batch["target_weights"] for w in ws], device=counts.device)
        mask = None if out.mask is None else out.mask[rows]
        flat = [t for ts in targets for t in ts]
        return self.llm.loss(out.prompts[rows], mask, [prefixes[i] for i in rows.tolist()], flat, weights)

    # --- evaluation -----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: CaptionBatch, metrics: Any, split: str) -> list[str]:
        if self.count_skipped(batch, split):
            return []
        task = self.task
        preds = self.caption(batch["pixels"], batch.get("prompts"), task.decoding if task is not None else None)
        if all(batch["references"]):  # a split without answers (VQA test-dev) gives predictions only
            metrics.update_batch(preds, batch)
        return preds

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        preds = self._evaluate(batch, self.val_metrics, "val")
        if batch_idx == 0 and preds:
            k = self.num_logged_samples
            self.logged_samples = [
                {"pixels": p.detach().cpu(), "caption": c, "references": r, "id": i}
                for p, c, r, i in zip(batch["pixels"][:k], preds[:k], batch["references"][:k], batch["ids"][:k])
            ]

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        self.report_skipped("val")

    def on_test_epoch_start(self) -> None:
        self._thumbnails, self._thumbnail_failed = [], False
        self._pixel_stats = module_normalisation(self) if self.gallery_size else None

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        preds = self._evaluate(batch, self.test_metrics, "test")
        prompts = batch.get("prompts")
        for k, (i, caption, refs) in enumerate(zip(batch["ids"], preds, batch["references"], strict=True)):
            row = {"id": i, "caption": caption, "references": refs}
            self._outputs.append(row if prompts is None else {"id": i, "prompt": prompts[k], **row})
        if preds:
            self._keep_thumbnails(batch)

    def _keep_thumbnails(self, batch: CaptionBatch) -> None:
        """Thumbnails of this rank's first gallery samples: its share of ``gallery_size``, so that all ranks
        together (a distributed sampler deals samples out in turn) hold about the first ``gallery_size``."""
        quota = math.ceil(self.gallery_size / world_size())
        for pixels, sample_id in zip(batch["pixels"], batch["ids"]):
            if len(self._thumbnails) >= quota:
                return
            uri = None
            if not self._thumbnail_failed:
                try:
                    uri = thumbnail_uri(pixels, self._pixel_stats)
                except Exception as err:  # a picture the gallery cannot show costs the gallery its images only
                    what = f"{type(err).__name__}: {err}"
                    log.warning("gallery: no thumbnail for sample %s (%s), nor for those after it", sample_id, what)
                    self._thumbnail_failed = True
            self._thumbnails.append((sample_id, uri))

    def on_test_epoch_end(self) -> None:
        scores = self._log_metrics("test", self.test_metrics)
        skipped = self.report_skipped("test")  # stops (every rank) when no test sample was readable
        rows = _unique_by_id(gather_objects(self._outputs))
        self._outputs = []
        thumbnails = dict(gather_objects(self._thumbnails)) if self.gallery_size else {}  # collective: every rank
        self._thumbnails = []
        out_dir = self._run_dir()  # every rank asks: trainer.log_dir is a collective call under DDP
        task = self.task
        if self.trainer.is_global_zero:
            summary = {**scores, "skipped": skipped}
            (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            _write_jsonl(out_dir / "predictions.jsonl", rows)
            rank_zero_info(f"test metrics: {out_dir / 'metrics.json'}  predictions: {out_dir / 'predictions.jsonl'}")
            if task is not None:
                name, content = task.submission(rows)
                (out_dir / name).write_text(json.dumps(content) + "\n")
                rank_zero_info(f"submission file: {out_dir / name} ({len(rows)} answers)")
            if not scores and rows:
                rank_zero_info("test: no references in this split (e.g. VQA test-dev): predictions only, no scores")
            if self.gallery_size:
                self._write_gallery(out_dir / "gallery.html", summary, rows, thumbnails)

    def _write_gallery(
        self, path: Path, summary: dict[str, Any], rows: list[dict[str, Any]], thumbnails: dict[str, str | None]
    ) -> None:
        """``gallery.html`` of the first ``gallery_size`` test rows that have a thumbnail entry, each scored by the
        test metric over the whole test set (CIDEr-D's document frequencies); a failure here is a warning, never the
        loss of the files already written."""
        try:
            metric = self.test_metrics
            scored = [r for r in rows if r["references"]]
            name = None
            by_id: dict[str, float] = {}
            if isinstance(metric, ScoresSamples) and scored:
                preds, refs = [r["caption"] for r in scored], [r["references"] for r in scored]
                by_id = dict(zip([r["id"] for r in scored], metric.sample_scores(preds, refs), strict=True))
                name = metric.sample_score_name
            shown = [r for r in rows if r["id"] in thumbnails][: self.gallery_size]
            samples = [{**r, "score": by_id.get(r["id"]), "thumbnail": thumbnails[r["id"]]} for r in shown]
            title = f"vlgen test: {path.parent.name}"
            write_gallery(
                path, summary, samples, name, answer_counts=self.task is not None, total=len(rows), title=title
            )
        except Exception as err:
            what = f"{type(err).__name__}: {err}"
            log.warning("gallery: %s not written (%s); metrics.json and predictions.jsonl are", path, what)
            return
        rank_zero_info(f"gallery: {path}")

    def predict_step(self, batch: CaptionBatch, batch_idx: int) -> list[dict[str, str]]:
        if self.count_skipped(batch, "predict"):
            return []
        task = self.task
        captions = self.caption(batch["pixels"], batch.get("prompts"), task.decoding if task is not None else None)
        rows = [{"id": i, "caption": c} for i, c in zip(batch["ids"], captions, strict=True)]
        self._outputs.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        skipped = self.report_skipped("predict")  # stops (every rank) when no sample was readable
        rows = _unique_by_id(gather_objects(self._outputs))
        self._outputs = []
        out_dir = self._run_dir()
        if self.trainer.is_global_zero:
            _write_jsonl(out_dir / "predictions.jsonl", rows)
            summary = {"predictions": len(rows), "skipped": skipped}
            (out_dir / "predict_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            rank_zero_info(
                f"predictions: {out_dir / 'predictions.jsonl'} ({len(rows)} captions, {skipped} unreadable samples "
                "skipped)"
            )

    def _run_dir(self) -> Path:
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    def _log_metrics(self, stage: str, metrics: Any) -> dict[str, float]:
        if metrics.is_empty() or self.trainer.sanity_checking:
            metrics.reset()  # the sanity check only proves the loop runs; its scores mean nothing
            return {}
        scores = {f"{stage}/{k}": float(v) for k, v in metrics.compute().items()}
        metrics.reset()
        self.log_dict(scores)  # identical on every rank: compute() already gathered all samples
        named = {k.split("/", 1)[1]: v for k, v in scores.items()}
        if stage == "test" or self.trainer.is_global_zero:  # per question type (VQAv2 has 65) only in the files
            shown = {k: v for k, v in named.items() if not k.startswith("question_type=")}
            rank_zero_info(f"{stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        return named


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
