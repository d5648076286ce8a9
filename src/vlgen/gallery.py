"""A test run as one self-contained web page, ``gallery.html``: its metrics, then a row per sample with a thumbnail.

Each row shows the picture (a clip: a few of its frames side by side), the sample's id, its question when it has one,
the generated text, the references (for VQA the annotators' answers, each with its count) and the sample's own
score, which the metric gives (:class:`~vlgen.interfaces.ScoresSamples`: CIDEr-D per caption over the whole test set,
VQA accuracy per question). Clicking the score or id header sorts the rows; ``#sort=score-desc`` (``score`` or
``id``, ``asc`` or ``desc``) in the address sorts them on opening. Pictures are JPEGs inside the page (``data:`` URIs)
and the page loads nothing else, so it opens from disk, offline, wherever it is copied.

Thumbnails undo the encoder's normalisation: :func:`normalisation` measures it by passing a black, a white and a grey
picture through the encoder's evaluation transform, so any encoder whose transform ends in a per-channel affine map
(``Normalize``: timm, CLIP, BLIP-2) shows its true colours without saying its statistics. For any other transform the
pixels are stretched to the byte range instead. The page's script also records, for tests and tools, the order it
shows (``data-sorted`` on ``<body>``) and how many pictures decoded (``data-images-loaded``).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlgen.interfaces import ProvidesImageTransform

log = logging.getLogger(__name__)

Stats = tuple[Tensor, Tensor]  # per-channel (mean, std), each [C]
THUMBNAIL_HEIGHT = 128  # pixels of a thumbnail's (frame's) height at most; smaller pictures keep their size
THUMBNAIL_FRAMES = 4  # frames of a clip shown side by side
_PROBE_SIZE = 224


def normalisation(transform: Callable[[Any], Tensor]) -> Stats | None:
    """The per-channel ``(mean, std)`` that ``transform`` (PIL image -> ``[C, H, W]``) normalises with, or ``None``
    when its output is no per-channel affine map of the input's ``[0, 1]`` values.

    It is measured, not read from the transform: a black picture comes out as ``-mean / std`` and a white one as
    ``(1 - mean) / std``; a mid-grey one must then land where the affine map puts it, else the transform is not one
    (a non-linear colour step) and ``None`` says to stretch the pixels instead.
    """

    def probe(level: int) -> Tensor:
        out = transform(Image.new("RGB", (_PROBE_SIZE, _PROBE_SIZE), (level, level, level)))
        if not isinstance(out, Tensor) or out.ndim != 3:
            raise ValueError(f"the transform gives {type(out).__name__}, not a [C, H, W] tensor")
        return out.detach().double().flatten(1).mean(1)  # [C]: a plain picture stays plain through resize and crop

    black, white, grey = probe(0), probe(255), probe(128)
    span = white - black
    if not bool(torch.isfinite(span).all()) or bool((span <= 0).any()):
        return None
    std = 1 / span
    mean = -black * std
    if not torch.allclose(grey * std + mean, torch.full_like(grey, 128 / 255), atol=0.02):
        return None
    return mean.float(), std.float()


def module_normalisation(module: Any) -> Stats | None:
    """:func:`normalisation` of ``module``'s evaluation transform (:class:`~vlgen.interfaces.ProvidesImageTransform`),
    or ``None`` when it has none or the measurement fails, so pictures are never lost to it (they get stretched)."""
    if not isinstance(module, ProvidesImageTransform):
        return None
    try:
        return normalisation(module.image_transform(False))
    except Exception as err:  # a transform that cannot read a plain picture: stretch instead, say why once
        log.warning("gallery: cannot measure the encoder's normalisation (%s); pictures are stretched instead", err)
        return None


def to_uint8_image(pixels: Tensor, stats: Stats | None = None, max_frames: int | None = None) -> Any:
    """A normalised ``[C, H, W]`` image -> ``[H, W, C]`` uint8 array; a ``[T, C, H, W]`` clip -> its frames side by
    side, ``[H, T*W, C]``, so a table shows the motion its caption describes.

    Args:
        pixels: what the data module gave the model (already transformed).
        stats: the transform's ``(mean, std)`` (:func:`normalisation`), undone to give the true colours; without
            them the pixels are stretched to span 0..255 (fine for a look, not for colours).
        max_frames: of a longer clip keep this many frames, evenly spaced, first and last included.
    """
    pixels = pixels.detach().float().cpu()
    if pixels.ndim == 4:
        if max_frames is not None and pixels.shape[0] > max_frames:
            keep = torch.linspace(0, pixels.shape[0] - 1, max_frames).round().long()
            pixels = pixels[keep]
        pixels = torch.cat(list(pixels), dim=-1)  # T x [C, H, W] -> [C, H, T*W]
    if stats is not None:
        mean, std = stats
        scaled = (pixels * std.view(-1, 1, 1) + mean.view(-1, 1, 1)).clamp(0, 1)
    else:
        lo, hi = pixels.min(), pixels.max()
        scaled = (pixels - lo) / (hi - lo).clamp_min(1e-6)
    image = (scaled * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def thumbnail_uri(
    pixels: Tensor,
    stats: Stats | None = None,
    height: int = THUMBNAIL_HEIGHT,
    max_frames: int = THUMBNAIL_FRAMES,
    quality: int = 85,
) -> str:
    """A sample's pixels (:func:`to_uint8_image`) as a JPEG ``data:`` URI, at most ``height`` pixels high (a clip:
    ``max_frames`` frames side by side), to put in a page as it is."""
    image = Image.fromarray(to_uint8_image(pixels, stats, max_frames))
    if image.height > height:
        image = image.resize((max(1, round(image.width * height / image.height)), height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_gallery(
    path: Path,
    metrics: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    score_name: str | None,
    *,
    answer_counts: bool = False,
    total: int | None = None,
    title: str = "vlgen test",
) -> Path:
    """Write the gallery page to ``path`` and return it.

    Args:
        metrics: the run's scores, as ``metrics.json`` holds them, shown above the samples.
        samples: rows with ``id``, ``caption`` (generated), ``references``, optionally ``prompt`` (the question),
            ``score`` (a number or ``None``) and ``thumbnail`` (a ``data:`` URI or ``None``).
        score_name: what the score column holds (``CIDEr-D`` ...); ``None`` when no sample has a score.
        answer_counts: show the references as distinct answers with their counts (VQA's annotators), not a list.
        total: samples in the test set, when the page shows only some of them.
        title: the page's heading.
    """
    shown = len(samples)
    has_prompts = any(s.get("prompt") is not None for s in samples)
    count = f"{shown} samples" if total is None or total == shown else f"{shown} of {total} samples"
    summary = count + (f"; score: {score_name} per sample" if score_name else "")
    head = ["<th>image</th>", _sort_header("id", "id", "asc")]
    if has_prompts:
        head.append("<th>question</th>")
    head += ["<th>generated</th>", "<th>references</th>", _sort_header("score", score_name or "score", "desc")]
    scores = [abs(s["score"]) for s in samples if _known(s.get("score"))]
    decimals = 3 if all(v < 10 for v in scores) else 1  # CIDEr-D 1.234, VQA accuracy in percent 66.7
    rows = [_row(s, has_prompts, answer_counts, decimals) for s in samples]
    page = _PAGE.format(
        title=_esc(title),
        summary=_esc(summary),
        metrics=_metrics_table(metrics),
        head="".join(head),
        rows="\n".join(rows),
        style=_STYLE,
        script=_SCRIPT,
    )
    path.write_text(page, encoding="utf-8")
    return path


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    cells = "".join(
        f'<div class="metric"><span class="key">{_esc(k)}</span> <span class="value">{_esc(_number(v))}</span></div>'
        for k, v in metrics.items()
    )
    return f'<div id="metrics">{cells}</div>' if cells else '<div id="metrics">no scores (no references)</div>'


def _sort_header(column: str, label: str, first: str) -> str:
    return f'<th class="sortable" data-column="{column}" data-first="{first}" aria-sort="none">{_esc(label)}</th>'


def _references(refs: Sequence[str], answer_counts: bool) -> str:
    if answer_counts:
        items = [f"{_esc(a)} <span class='count'>&times;{n}</span>" for a, n in Counter(refs).most_common()]
        return " &middot; ".join(items)
    if not refs:
        return ""
    return "<ol>" + "".join(f"<li>{_esc(r)}</li>" for r in refs) + "</ol>"


def _known(score: Any) -> bool:
    return score is not None and not math.isnan(score)


def _row(sample: Mapping[str, Any], has_prompts: bool, answer_counts: bool, decimals: int) -> str:
    uri = sample.get("thumbnail")
    image = f'<img src="{_esc(uri)}" alt="{_esc(sample["id"])}">' if uri else '<span class="missing">no image</span>'
    score = sample.get("score")
    known = _known(score)
    cells = [f"<td>{image}</td>", f'<td class="id">{_esc(sample["id"])}</td>']
    if has_prompts:
        cells.append(f"<td>{_esc(sample.get('prompt') or '')}</td>")
    cells += [
        f'<td class="generated">{_esc(sample.get("caption", ""))}</td>',
        f'<td class="refs">{_references(sample.get("references") or [], answer_counts)}</td>',
        f'<td class="score">{f"{score:.{decimals}f}" if known else ""}</td>',
    ]
    data_score = repr(float(score)) if known else ""
    return f'<tr data-id="{_esc(sample["id"])}" data-score="{data_score}">{"".join(cells)}</tr>'


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
#summary { color: #555; margin: 0 0 12px; }
#metrics { display: flex; flex-wrap: wrap; gap: 6px 18px; margin-bottom: 16px; }
.metric .key { color: #666; }
.metric .value { font-weight: 600; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; white-space: nowrap; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable::after { content: " \\2195"; color: #999; }
th[aria-sort="ascending"]::after { content: " \\25B2"; color: #222; }
th[aria-sort="descending"]::after { content: " \\25BC"; color: #222; }
td:first-child { width: 1%; }
td img { height: 96px; display: block; }
td.id { font-family: ui-monospace, monospace; font-size: 12px; }
td.generated { font-weight: 600; }
td.refs ol { margin: 0; padding-left: 18px; }
td.score { font-variant-numeric: tabular-nums; text-align: right; }
.count, .missing { color: #888; }
"""

_SCRIPT = """
(function () {
  var body = document.body, tbody = document.querySelector("#samples tbody");
  var headers = document.querySelectorAll("th.sortable");
  function value(row, column) {
    return column === "score" ? parseFloat(row.getAttribute("data-score")) : row.getAttribute("data-id");
  }
  function compare(a, b, column, sign) {
    var x = value(a, column), y = value(b, column);
    if (column === "score") {
      if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }  // unscored rows last, either way
      return sign * (x - y);
    }
    return sign * x.localeCompare(y, undefined, {numeric: true});
  }
  function sortBy(column, direction) {
    var sign = direction === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) { return compare(a, b, column, sign); });
    rows.forEach(function (row) { tbody.appendChild(row); });
    Array.prototype.forEach.call(headers, function (th) {
      var on = th.getAttribute("data-column") === column;
      th.setAttribute("aria-sort", on ? (sign > 0 ? "ascending" : "descending") : "none");
    });
    body.setAttribute("data-sorted", column + "-" + direction);
  }
  function fromHash() {
    var match = /sort=(score|id)-(asc|desc)/.exec(window.location.hash);
    if (match) { sortBy(match[1], match[2]); }
  }
  Array.prototype.forEach.call(headers, function (th) {
    th.addEventListener("click", function () {
      var column = th.getAttribute("data-column"), current = body.getAttribute("data-sorted") || "";
      var direction = th.getAttribute("data-first");
      if (current.indexOf(column + "-") === 0) { direction = current.slice(-3) === "asc" ? "desc" : "asc"; }
      sortBy(column, direction);
      try { history.replaceState(null, "", "#sort=" + column + "-" + direction); } catch (e) { /* file: quirks */ }
    });
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
  function countImages() {
    var loaded = Array.prototype.filter.call(document.images, function (img) {
      return img.complete && img.naturalWidth > 0;
    });
    body.setAttribute("data-images-loaded", String(loaded.length));
  }
  if (document.readyState === "complete") { countImages(); } else { window.addEventListener("load", countImages); }
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<p id="summary">{summary}</p>
{metrics}
<table id="samples">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<script>{script}</script>
</body>
</html>
"""
