"""VQAAccuracy: parity with the official VQA evaluation (and LAVIS's GQA scoring), chunking, ids, types, DDP."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from vqa_cases import (
    EXACT_CASES,
    HAND_CASES,
    MANY_PERIODS,
    MATCH_COUNT_CASES,
    POOL,
    max_differences,
    official_exact,
    official_modules,
    random_cases,
)

from vlgen.metrics import (
    VQAAccuracy,
    exact_match,
    normalize_answer,
    process_digits_articles,
    process_punctuation,
    vqa_score,
)
from vlgen.metrics import vqa as vqa_module


def _official_tool():
    return official_modules()[1].VQAEval()


def _all_cases():
    return random_cases(300, seed=0) + [case for case, _ in HAND_CASES] + MATCH_COUNT_CASES


def test_tables_equal_the_official_ones():
    tool = _official_tool()
    assert vqa_module.CONTRACTIONS == tool.contractions
    assert vqa_module.NUMBER_WORDS == tool.manualMap
    assert sorted(vqa_module.ARTICLES) == sorted(tool.articles)
    assert list(vqa_module.PUNCTUATION) == tool.punct


def test_text_processing_matches_the_official():
    tool = _official_tool()
    texts = set(POOL)
    for case in _all_cases():
        texts.add(case["pred"])
        texts.update(case["answers"])
    for text in sorted(texts):
        assert process_punctuation(text) == tool.processPunctuation(text), repr(text)
        assert process_digits_articles(text) == tool.processDigitArticle(text), repr(text)


def test_at_most_32_periods_are_removed():
    # The official's count=re.UNICODE (32): of 40 "x." the last 8 periods stay.
    assert process_punctuation(MANY_PERIODS) == "x" * 32 + "x." * 8
    assert process_punctuation("3.5.") == "3.5"  # a period before a digit stays
    assert normalize_answer("\tThe Dog.\n") == "dog"
    assert normalize_answer("Whats up") == "what's up"
    assert normalize_answer("none") == "0"


def test_parity_with_the_official_evaluation():
    cases = _all_cases()
    worst = max_differences(cases)
    assert max(worst.values()) < 1e-9, worst


@pytest.mark.parametrize(("case", "expected"), HAND_CASES, ids=[repr(c["pred"]) for c, _ in HAND_CASES])
def test_hand_computed_scores(case, expected):
    assert vqa_score(case["pred"], case["answers"]) == pytest.approx(expected, abs=1e-12)


def test_match_counts_zero_to_ten():
    # m of 10 answers match: the 10 - m subsets without a match keep m, the m subsets with one keep m - 1.
    scores = [vqa_score(c["pred"], c["answers"]) for c in MATCH_COUNT_CASES]
    assert scores == pytest.approx([0.0, 0.3, 0.6, 0.9] + [1.0] * 7, abs=1e-12)


def test_exact_mode_as_lavis_scores_gqa():
    for pred, answer, expected in EXACT_CASES:
        assert exact_match(pred, answer) == expected == official_exact(pred, answer), (pred, answer)
    for pred in POOL:
        for answer in ("left", "dog", "2", "t shirt", "hot dog", "1000 dogs", "yes"):
            assert exact_match(pred, answer) == official_exact(pred, answer), (pred, answer)
    metric = VQAAccuracy(mode="exact")
    metric.update([p for p, _, _ in EXACT_CASES], [[a] for _, a, _ in EXACT_CASES])
    expected = 100 * sum(e for _, _, e in EXACT_CASES) / len(EXACT_CASES)
    assert metric.compute() == {"accuracy": pytest.approx(expected, abs=1e-12)}


def test_answer_lists_are_validated():
    with pytest.raises(ValueError, match="one reference per question"):
        VQAAccuracy(mode="exact").update(["left"], [["left", "right"]])
    with pytest.raises(ValueError, match="empty"):
        VQAAccuracy().update(["left"], [[]])
    with pytest.raises(ValueError, match="2 predictions but 1 ids"):
        VQAAccuracy().update(["a", "b"], [["a"], ["b"]], ids=["0"])
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("a", [])
    with pytest.raises(ValueError, match="mode"):
        VQAAccuracy(mode="fuzzy")  # type: ignore[arg-type]


def _update(metric: VQAAccuracy, cases, ids=None) -> None:
    metric.update(
        [c["pred"] for c in cases],
        [c["answers"] for c in cases],
        ids=ids,
        answer_types=[c["answer_type"] for c in cases],
        question_types=[c["question_type"] for c in cases],
    )


def test_chunked_updates_equal_one_update():
    cases = random_cases(50, seed=1)
    one, chunked = VQAAccuracy(), VQAAccuracy()
    _update(one, cases)
    for i in range(0, len(cases), 7):
        _update(chunked, cases[i : i + 7])
    assert one.compute() == chunked.compute()
    chunked.reset()
    assert chunked.is_empty()


def test_ids_deduplicate_padded_repeats():
    cases = random_cases(6, seed=2)
    ids = [str(i) for i in range(6)]
    plain, padded, unnamed = VQAAccuracy(), VQAAccuracy(), VQAAccuracy()
    _update(plain, cases, ids)
    _update(padded, cases + cases[:2], ids + ids[:2])
    assert plain.compute() == padded.compute()
    # Rows without ids are all kept: the repeats count twice.
    _update(unnamed, cases + cases[:2])
    scores = [vqa_score(c["pred"], c["answers"]) for c in cases + cases[:2]]
    assert unnamed.compute()["accuracy"] == pytest.approx(100 * sum(scores) / 8, abs=1e-12)


def test_per_type_keys_are_sorted_means():
    m = VQAAccuracy()
    m.update(
        ["yes", "2", "red", "no"],
        [["yes"] * 10, ["2"] * 10, ["blue"] * 10, ["yes"] * 10],
        answer_types=["yes/no", "number", "other", "yes/no"],
        question_types=["is the", "how many", "what color is the", "is the"],
    )
    got = m.compute()
    assert list(got) == [
        "accuracy",
        "answer_type=number",
        "answer_type=other",
        "answer_type=yes/no",
        "question_type=how many",
        "question_type=is the",
        "question_type=what color is the",
    ]
    assert got["accuracy"] == 50.0 and got["answer_type=yes/no"] == 50.0 and got["answer_type=number"] == 100.0
    assert got["answer_type=other"] == 0.0 and got["question_type=is the"] == 50.0
    plain = VQAAccuracy()
    plain.update(["yes"], [["yes"] * 10])
    assert list(plain.compute()) == ["accuracy"]


def test_update_batch_reads_references_ids_and_types():
    m = VQAAccuracy()
    batch = {"references": [["yes"] * 10, ["no"] * 10], "ids": ["q1", "q2"], "answer_types": ["yes/no"] * 2}
    m.update_batch(["yes", "yes"], batch)
    m.update_batch(["yes"], {"references": [["yes"] * 10], "ids": ["q1"]})  # a repeated id: ignored
    assert m.compute() == {"accuracy": 50.0, "answer_type=yes/no": 50.0}


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric VQAAccuracy was called before")
def test_compute_before_update_raises():
    with pytest.raises(ValueError, match="before any update"):
        VQAAccuracy().compute()


def test_gathered_rows_from_two_ranks(monkeypatch):
    # Rank 1's rows (with a repeat of rank 0's first sample, as a DistributedSampler pads) are appended by the gather.
    cases = random_cases(9, seed=3)
    ids = [str(i) for i in range(9)]
    single = VQAAccuracy()
    _update(single, cases, ids)
    rank1 = VQAAccuracy()
    _update(rank1, cases[5:] + cases[:1], ids[5:] + ids[:1])
    other_rows = list(zip(rank1.ids, rank1.preds, rank1.answers, rank1.answer_types, rank1.question_types))
    monkeypatch.setattr(vqa_module, "gather_objects", lambda rows: list(rows) + other_rows)
    rank0 = VQAAccuracy()
    _update(rank0, cases[:5], ids[:5])
    assert rank0.compute() == single.compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, cases, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = VQAAccuracy()
    # DistributedSampler-style: rank r takes every other sample, padded by repeating the first ones.
    ids = list(range(len(cases)))
    ids += ids[: len(ids) % 2]
    mine = ids[rank::2]
    _update(m, [cases[i] for i in mine], [str(i) for i in mine])
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_score_the_whole_set():
    cases = random_cases(21, seed=4)
    single = VQAAccuracy()
    _update(single, cases)
    expected = single.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, cases, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # The gathered rows come in rank order, not sample order, so sums may differ in the last bit.
    assert results[0] == pytest.approx(expected, abs=1e-9) and results[1] == pytest.approx(expected, abs=1e-9)
    assert list(results[0]) == list(expected)
