"""VQAAccuracy against the official VQA evaluation (the copy in the salesforce-lavis wheel) on seeded random cases.

    python bench/vqa_parity.py [--n 2000] [--seed 0]

Builds ``--n`` random questions from the stress pool of ``tests/metrics/vqa_cases.py`` plus its hand-written and
match-count cases, scores them with the official ``VQAEval`` (12 decimals) and with :class:`vlgen.metrics.VQAAccuracy`,
and prints the number of cases and the largest absolute differences in percentage points: overall, per answer type,
per question type and per question. Also checks the exact (GQA) mode against LAVIS's scoring on every case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "metrics"))

from vqa_cases import HAND_CASES, MATCH_COUNT_CASES, max_differences, official_exact, random_cases

from vlgen.metrics import exact_match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="random cases (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = random_cases(args.n, args.seed) + [case for case, _ in HAND_CASES] + MATCH_COUNT_CASES
    worst = max_differences(cases)
    exact_pairs = [(c["pred"], a) for c in cases for a in dict.fromkeys(c["answers"])]
    exact_mismatches = sum(exact_match(p, a) != official_exact(p, a) for p, a in exact_pairs)
    print(f"cases: {len(cases)} ({args.n} random, seed {args.seed}, + {len(cases) - args.n} hand-written)")
    for key, value in worst.items():
        print(f"max |ours - official| {key:>13}: {value:.3g} points")
    print(f"exact mode: {exact_mismatches} mismatches with LAVIS's GQA scoring in {len(exact_pairs)} pairs")


if __name__ == "__main__":
    main()
