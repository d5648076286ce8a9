"""gallery.html: per-sample scores that add up to the corpus metrics, thumbnails in their true colours, escaped text,
the Captioner writing it after a test (images, clips, VQA; a failure costs only the gallery), and the page itself
opened from disk in headless Chromium (sorting, decoded images, a screenshot that is not blank).

The end-to-end `vlgen test` run that writes a gallery is in tests/cli/test_gallery_cli.py, beside the other CLI runs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from gallery_browser import check_in_browser, chromium_binary, rows
from PIL import Image
from torch.utils.data import DataLoader

from vlgen.bridges import MLPProjector
from vlgen.data import VQATask
from vlgen.encoders import FrameEncoder, TimmEncoder
from vlgen.encoders.hf_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlgen.gallery import normalisation, thumbnail_uri, to_uint8_image, write_gallery
from vlgen.interfaces import ScoresSamples
from vlgen.llms import CausalLM, Decoding
from vlgen.metrics import CaptionMetrics, VQAAccuracy
from vlgen.models import Captioner

VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
CLIP = {"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}

PREDS = ["a red circle left of a blue square", "a green triangle", "", "a large red circle", "a blue square above"]
REFS = [
    ["a red circle to the left of a blue square", "a red circle and a blue square"],
    ["a small green triangle", "a green triangle on its own"],
    ["a yellow circle"],
    ["a large red circle", "one big red circle", "a red circle"],
    ["a blue square above a red circle", "a blue square on top"],
]


# --- per-sample scores ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "use_java", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["python-ptb", "java-ptb"]
)  # with Java, compute() also starts METEOR: tens of seconds on a loaded machine
def test_per_sample_cider_averages_to_the_corpus_cider(use_java):
    if use_java and not shutil.which("java"):
        pytest.skip("java not installed: the Java PTB tokenizer is not used")
    metric = CaptionMetrics(use_java=use_java)
    metric.update(PREDS, REFS, ids=[str(i) for i in range(len(PREDS))])
    corpus = metric.compute()["CIDEr"]
    per_sample = metric.sample_scores(PREDS, REFS)
    assert isinstance(metric, ScoresSamples) and metric.sample_score_name == "CIDEr-D"
    assert len(per_sample) == len(PREDS) and len(set(per_sample)) > 1
    # pycocoevalcap's corpus CIDEr-D is the plain mean of its per-image scores, so the gallery's column adds up
    assert np.mean(per_sample) == pytest.approx(corpus, rel=1e-12, abs=1e-12)
    assert per_sample[2] == 0.0  # the empty caption, scored as a word no reference has


def test_per_sample_cider_takes_its_document_frequencies_from_the_whole_set():
    """So the gallery must score the whole test set at once: alone, a sample's n-grams weigh differently."""
    metric = CaptionMetrics(use_java=False)
    together = metric.sample_scores(PREDS, REFS)
    alone = [metric.sample_scores(PREDS[i : i + 2], REFS[i : i + 2])[0] for i in (0, 3)]
    assert alone != [together[0], together[3]]
    assert metric.sample_scores([], []) == []
    with pytest.raises(ValueError, match="2 predictions and 1 reference"):
        metric.sample_scores(PREDS[:2], REFS[:1])


@pytest.mark.parametrize("mode", ["vqa", "exact"])
def test_per_question_accuracy_averages_to_the_vqa_accuracy(mode):
    if mode == "vqa":
        preds = ["red", "Two", "yes", "blue", "the circle"]
        answers = [
            ["red"] * 7 + ["orange"] * 3,
            ["2"] * 2 + ["two"] * 8,
            ["no"] * 10,
            ["blue"] * 1 + ["green"] * 9,
            ["circle"] * 4 + ["ring"] * 6,
        ]
    else:
        preds, answers = ["red", "Two", "a dog", "no"], [["red"], ["2"], ["dog"], ["yes"]]
    metric = VQAAccuracy(mode=mode)
    metric.update(preds, answers, ids=[str(i) for i in range(len(preds))])
    accuracy = metric.compute()["accuracy"]
    per_question = metric.sample_scores(preds, answers)
    assert isinstance(metric, ScoresSamples) and "%" in metric.sample_score_name
    assert all(0 <= s <= 100 for s in per_question) and len(set(per_question)) > 1
    assert np.mean(per_question) == pytest.approx(accuracy, rel=1e-12)


# --- thumbnails -----------------------------------------------------------------------------------------------------
def smooth_picture(size: int = 32) -> Image.Image:
    """A colour gradient (JPEG keeps smooth pictures close) in the middle of the byte range, 60..180."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    return Image.fromarray((60 + rgb * 120).round().astype(np.uint8))


def decode(uri: str) -> np.ndarray:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))).convert("RGB")).astype(int)


def test_thumbnail_undoes_the_encoders_normalisation():
    transform = TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT, transform=CLIP).image_transform(False)
    stats = normalisation(transform)
    assert stats is not None
    assert torch.allclose(stats[0], torch.tensor(OPENAI_CLIP_MEAN), atol=1e-4)
    assert torch.allclose(stats[1], torch.tensor(OPENAI_CLIP_STD), atol=1e-4)
    picture = smooth_picture()
    original = np.asarray(picture).astype(int)
    pixels = transform(picture)
    assert np.abs(to_uint8_image(pixels, stats).astype(int) - original).max() <= 1  # exact up to rounding
    assert np.abs(decode(thumbnail_uri(pixels, stats)) - original).mean() < 3  # JPEG's loss only
    # without the statistics the pixels are only stretched to 0..255: the colours are off
    assert np.abs(to_uint8_image(pixels).astype(int) - original).mean() > 20


def test_a_transform_that_is_no_affine_map_is_not_undone():
    def gamma(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img) / 255.0).permute(2, 0, 1) ** 2.2

    assert normalisation(gamma) is None
    pixels = torch.rand(3, 8, 8)
    assert to_uint8_image(pixels).shape == (8, 8, 3)  # stretched instead


def test_a_clip_shows_a_few_frames_side_by_side_and_large_pictures_shrink():
    stats = (torch.full((3,), 0.5), torch.full((3,), 0.5))
    frames = torch.linspace(-1, 1, 8)[:, None, None, None].expand(8, 3, 16, 16)  # frame k is all one grey
    strip = to_uint8_image(frames, stats, max_frames=4)
    assert strip.shape == (16, 64, 3)
    levels = [int(strip[0, 16 * k, 0]) for k in range(4)]
    expected = [round((float(frames[i, 0, 0, 0]) + 1) / 2 * 255) for i in (0, 2, 5, 7)]  # first and last included
    assert levels == expected
    assert decode(thumbnail_uri(frames, stats, max_frames=4)).shape == (16, 64, 3)
    assert decode(thumbnail_uri(torch.zeros(3, 300, 200), stats, height=128)).shape == (128, 85, 3)


# --- the page -------------------------------------------------------------------------------------------------------
HOSTILE = "<script>alert(\"x\")</script> & 'quotes'"


def test_every_text_on_the_page_is_escaped(tmp_path):
    sample = {"id": HOSTILE, "prompt": HOSTILE, "caption": HOSTILE, "references": [HOSTILE, HOSTILE], "score": 1.0}
    page = write_gallery(tmp_path / "g.html", {HOSTILE: 1.5}, [sample], HOSTILE, title=HOSTILE).read_text()
    assert HOSTILE not in page and "<script>alert" not in page
    assert page.count("<script>") == 1  # the page's own sorting script, nothing injected
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in page
    counted = write_gallery(tmp_path / "c.html", {}, [sample], None, answer_counts=True).read_text()
    assert "&times;2" in counted and "<script>alert" not in counted


def test_the_page_loads_nothing_from_outside(tmp_path):
    page = write_gallery(tmp_path / "g.html", {"CIDEr": 1.0}, gallery_samples(3), "CIDEr-D").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "@import" not in page and "url(" not in page
    assert page.count("data:image/jpeg;base64,") == 3


def gallery_samples(n: int) -> list[dict]:
    """``n`` rows with colourful thumbnails, scores in no order (one missing) and ids that sort numerically."""
    generator = torch.Generator().manual_seed(0)
    scores = [0.5, 1.25, None, 0.125, 2.0, 0.75, 1.5, 0.0][:n]
    return [
        {
            "id": f"img_{k}",
            "caption": f"a caption {k}",
            "references": ["a red circle", "a blue square"],
            "score": scores[k % len(scores)],
            "thumbnail": thumbnail_uri(torch.rand(3, 48, 48, generator=generator) * 2 - 1),
        }
        for k in range(n)
    ]


# --- the Captioner writes it ----------------------------------------------------------------------------------------
@pytest.fixture
def no_java(monkeypatch):
    """Caption metrics on the Python tokenizer, without METEOR: Java's start would dominate these small tests."""
    monkeypatch.setattr("vlgen.metrics.captioning.java_available", lambda: False)


class Batches(pl.LightningDataModule):
    """Ready-made test batches, with a VQA task when one is given (the model reads ``datamodule.task``)."""

    def __init__(self, batches: list[dict], task: VQATask | None = None) -> None:
        super().__init__()
        self.batches, self.task = batches, task

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)


def caption_batch(ids: list[str], pixels: torch.Tensor, **extra) -> dict:
    return {"pixels": pixels, "captions": ["a red circle"] * len(ids), "ids": ids, "num_skipped": 0, **extra}


def run_test(model: Captioner, data: Batches, root: Path) -> Path:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.test(model, datamodule=data, verbose=False)
    return root


def captioner(tiny_llm_dir: Path, encoder, **kwargs) -> Captioner:
    llm = CausalLM(str(tiny_llm_dir), decoding=Decoding(max_new_tokens=3))
    return Captioner(encoder, MLPProjector(), llm, **kwargs)


def test_video_test_writes_a_gallery_of_frame_strips(no_java, tiny_llm_dir, tmp_path, caplog):
    encoder = FrameEncoder(TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT))
    model = captioner(tiny_llm_dir, encoder, gallery_size=3)
    refs = [["a red circle moves left"], ["a blue square"]]
    clips = [caption_batch([f"v{i}", f"v{i + 1}"], torch.randn(2, 4, 3, 32, 32), references=refs) for i in (0, 2)]
    data = Batches(clips)
    with caplog.at_level(logging.INFO):
        out = run_test(model, data, tmp_path)
    page = (out / "gallery.html").read_text()
    assert rows(page) == ["v0", "v1", "v2"]  # the first gallery_size samples
    assert "3 of 4 samples; score: CIDEr-D per sample" in page
    strips = [decode(u) for u in re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', page)]
    assert len(strips) == 3 and all(s.shape == (32, 4 * 32, 3) for s in strips)  # four frames side by side
    metrics = json.loads((out / "metrics.json").read_text())
    assert f'<span class="key">CIDEr</span> <span class="value">{metrics["CIDEr"]:.4g}</span>' in page
    assert f"gallery: {out / 'gallery.html'}" in caplog.text


def test_vqa_gallery_shows_questions_answer_counts_and_per_question_accuracy(tiny_llm_dir, tmp_path):
    model = captioner(tiny_llm_dir, TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT))
    answers = [["red"] * 7 + ["orange"] * 3, ["2"] * 10]
    batch = caption_batch(["q1", "q2"], torch.randn(2, 3, 32, 32), references=answers)
    batch["prompts"] = ["what colour is the circle", "how many squares"]
    task = VQATask(metric="vqa", decoding=Decoding(max_new_tokens=2))
    out = run_test(model, Batches([batch], task), tmp_path)
    page = (out / "gallery.html").read_text()
    assert rows(page) == ["q1", "q2"] and "<th>question</th>" in page and "how many squares" in page
    assert "red <span class='count'>&times;7</span> &middot; orange <span class='count'>&times;3</span>" in page
    assert "VQA accuracy (%)" in page
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    scores = [float(s) for s in re.findall(r'data-score="([^"]*)"', page)]
    expected = VQAAccuracy().sample_scores([p["caption"] for p in predictions], answers)
    assert scores == pytest.approx(expected)
    assert np.mean(scores) == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"])


def test_gallery_size_zero_writes_none(no_java, tiny_llm_dir, tmp_path):
    model = captioner(tiny_llm_dir, TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT), gallery_size=0)
    run_test(model, Batches([caption_batch(["a"], torch.randn(1, 3, 32, 32), references=[["x"]])]), tmp_path)
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "gallery.html").exists()


def test_a_failing_gallery_costs_only_the_gallery(no_java, tiny_llm_dir, tmp_path, monkeypatch, caplog):
    model = captioner(tiny_llm_dir, TimmEncoder("vit_tiny_patch16_224", model_kwargs=VIT))
    data = Batches([caption_batch(["a", "b"], torch.randn(2, 3, 32, 32), references=[["x"], ["y"]])])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlgen.models.captioner.thumbnail_uri", broken)  # no pictures: rows without images
    run_test(model, data, tmp_path / "thumbs")
    page = (tmp_path / "thumbs" / "gallery.html").read_text()
    assert rows(page) == ["a", "b"] and page.count("no image") == 2
    assert "no thumbnail for sample a (OSError: disk full)" in caplog.text

    monkeypatch.setattr("vlgen.models.captioner.write_gallery", broken)  # no page at all
    run_test(model, data, tmp_path / "page")
    assert not (tmp_path / "page" / "gallery.html").exists()
    assert (tmp_path / "page" / "metrics.json").is_file() and (tmp_path / "page" / "predictions.jsonl").is_file()
    assert "gallery.html not written (OSError: disk full)" in caplog.text


# --- in a real browser ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # three browser starts: seconds each on a loaded machine
def test_gallery_in_headless_chromium(tmp_path):
    chromium_binary()
    samples = gallery_samples(12)  # ids img_0 .. img_11: "img_10" sorts after "img_9"
    page = write_gallery(tmp_path / "gallery.html", {"CIDEr": 0.85, "skipped": 0}, samples, "CIDEr-D")
    check_in_browser(page, tmp_path)
