"""CaptionMetrics: parity with pycocoevalcap's COCOEvalCap, chunking, DDP gathering, the no-Java fallback."""

from __future__ import annotations

import random
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vlgen.metrics import CaptionMetrics
from vlgen.metrics.captioning import java_available, simple_ptb_tokenize

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def make_data(n: int = 20, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        c, s = rng.choice(COLORS), rng.choice(SHAPES)
        refs.append(
            [f"a {c} {s}", f"A {c} {s} on a white background.", f"there is a {c} {s}", f"one {c} {s}", "a shape"]
        )
        preds.append(rng.choice([f"a {c} {s}", f"a {rng.choice(COLORS)} {s}.", f"the {c} thing", "a red circle"]))
    return preds, refs


class _Coco:
    """The three things COCOEvalCap reads from a COCO object."""

    def __init__(self, caps: dict[int, list[str]]) -> None:
        self.imgToAnns = {k: [{"image_id": k, "caption": c} for c in v] for k, v in caps.items()}

    def getImgIds(self) -> list[int]:
        return list(self.imgToAnns)


needs_java = pytest.mark.skipif(not java_available(), reason="java is needed for pycocoevalcap's own pipeline")


@needs_java
def test_parity_with_cocoevalcap(monkeypatch):
    from pycocoevalcap import eval as coco_eval

    preds, refs = make_data()

    # SPICE downloads Stanford models: COCOEvalCap runs with a zero stand-in for it, everything else is its own.
    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    ref = coco_eval.COCOEvalCap(_Coco(dict(enumerate(refs))), _Coco({i: [p] for i, p in enumerate(preds)}))
    ref.evaluate()
    ours = CaptionMetrics()
    ours.update(preds, refs)
    got = ours.compute()
    assert set(got) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for key, value in got.items():
        assert value == pytest.approx(ref.eval[key], abs=1e-9), key


def test_chunked_updates_equal_one_update():
    preds, refs = make_data()
    one, chunked = CaptionMetrics(use_java=False), CaptionMetrics(use_java=False)
    one.update(preds, refs)
    for i in range(0, len(preds), 7):
        chunked.update(preds[i : i + 7], refs[i : i + 7])
    assert one.compute() == chunked.compute()
    chunked.reset()
    assert chunked.is_empty()


def test_perfect_beats_constant_caption():
    _, refs = make_data()
    perfect, constant = CaptionMetrics(use_java=False), CaptionMetrics(use_java=False)
    perfect.update([r[0] for r in refs], refs)
    constant.update(["a red circle"] * len(refs), refs)
    assert perfect.compute()["CIDEr"] > 2 * constant.compute()["CIDEr"]


def test_ids_deduplicate_padded_repeats():
    preds, refs = make_data(6)
    plain, padded = CaptionMetrics(use_java=False), CaptionMetrics(use_java=False)
    ids = [str(i) for i in range(6)]
    plain.update(preds, refs, ids=ids)
    padded.update(preds + preds[:2], refs + refs[:2], ids=ids + ids[:2])
    assert plain.compute() == padded.compute()


def test_empty_prediction_scores_zero_without_crashing():
    m = CaptionMetrics(use_java=False)
    m.update(["", "a red circle"], [["a blue square"], ["a red circle"]])
    scores = m.compute()
    assert 0 < scores["CIDEr"] and all(v == v for v in scores.values())  # finite, no NaN
    with pytest.raises(ValueError, match="before any update"):
        CaptionMetrics(use_java=False).compute()


@needs_java
def test_python_tokenizer_matches_ptb():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [
        "A man's dog, running on the beach.",
        "Two RED circles -- left of a triangle!",
        "It isn't a well-known 3-D shape; it's 2.5 cm wide?",
        "the cat: sitting (quietly) on a mat...",
        "They've said \"hello\" and we'll go",
    ]
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [simple_ptb_tokenize(c) for c in captions] == [java[i][0] for i in range(len(captions))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, preds, refs, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = CaptionMetrics(use_java=False)
    half = len(preds) // 2
    lo, hi = (0, half) if rank == 0 else (half, len(preds))
    m.update(preds[lo:hi], refs[lo:hi], ids=[str(i) for i in range(lo, hi)])
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


def test_two_ranks_score_the_whole_set():
    preds, refs = make_data()
    single = CaptionMetrics(use_java=False)
    single.update(preds, refs)
    expected = single.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, preds, refs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == expected and results[1] == expected
