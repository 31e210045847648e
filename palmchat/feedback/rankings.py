"""Merging several labellers' rankings of one task (Borda count) and measuring how much labellers agree.

Agreement (`GET /v1/label/stats`) is the **mean pairwise agreement**: for every task ranked by two or more
labellers, and every two of its labellers, the fraction of candidate pairs both order the same way;
averaged over the labeller pairs of a task, then over tasks. 1 means identical rankings; two independent
random rankings agree on 0.5 on average.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations


def borda(rankings: list[list[str]], candidates: list[str]) -> list[str]:
    """Merge rankings (lists of candidate ids, best first) into one order, best first (see the module docstring).
    A ranking that leaves candidates out gives them no points."""
    points, firsts = defaultdict(float), defaultdict(int)
    for ranking in rankings:
        k = len(ranking)
        for position, candidate in enumerate(ranking):
            points[candidate] += k - 1 - position
        if ranking:
            firsts[ranking[0]] += 1
    order = {c: i for i, c in enumerate(candidates)}
    return sorted(candidates, key=lambda c: (-points[c], -firsts[c], order[c]))


def pair_agreement(a: list[str], b: list[str]) -> float:
    """Fraction of the candidate pairs (of the candidates both rankings hold) that a and b order the same way."""
    pos_a, pos_b = {c: i for i, c in enumerate(a)}, {c: i for i, c in enumerate(b)}
    common = [c for c in a if c in pos_b]
    pairs = list(combinations(common, 2))
    if not pairs:
        return 1.0
    same = sum((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) for x, y in pairs)
    return same / len(pairs)


def agreement(rankings_by_task: dict[str, list[list[str]]]) -> tuple[float | None, int]:
    """(mean pairwise agreement, number of tasks it is measured on); None when no task has two labellers."""
    per_task = []
    for rankings in rankings_by_task.values():
        if len(rankings) >= 2:
            scores = [pair_agreement(a, b) for a, b in combinations(rankings, 2)]
            per_task.append(sum(scores) / len(scores))
    return (sum(per_task) / len(per_task) if per_task else None), len(per_task)
