"""Merging several labellers' rankings of one set of replies into one order, and measuring how much labellers agree.

Two merges, as Open-Assistant offered (`palmchat feedback export --merge borda|ranked-pairs`):
- **Borda count** (`borda`): in a ranking of K candidates the one at position p (0 = best) gets K-1-p points;
  candidates are ordered by total points, ties broken by how many labellers put them first, then by the order
  of `candidates` (sampling order).
- **Ranked pairs** (`ranked_pairs`, Tideman's method): for every two candidates x and y, count the labellers who
  put x above y (a labeller counts only for pairs their ranking holds both of: a ranking of a subset says nothing
  about the candidates it leaves out). Each pair with a majority is a victory of strength = margin (votes for the
  winner minus votes for the loser, as Open-Assistant's backend measured it, which left the order of equal
  victories to chance); victories are locked in from the strongest down, each unless it makes a cycle with those
  locked before; a tied pair locks nothing. The merged
  order takes, again and again, the candidate no remaining candidate beats in the locked graph. Ties are broken by
  one tie-breaking order, the Borda order of the same rankings: victories of equal margin go by more votes for
  the winner, then by the winner's place in the Borda order, then by the loser's; and where several candidates
  are unbeaten, the one first in the Borda order goes first. Ranked pairs elects the Condorcet winner (the
  candidate a majority prefers to each other one) whenever there is one, which Borda does not always do.

Agreement (`GET /v1/label/stats`) is the **mean pairwise agreement**: for every task ranked by two or more
labellers, and every two of its labellers, the fraction of candidate pairs both order the same way;
averaged over the labeller pairs of a task, then over tasks. 1 means identical rankings; two independent
random rankings agree on 0.5 on average.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

MERGES = ("borda", "ranked-pairs")


def merge(rankings: list[list[str]], candidates: list[str], method: str = "borda") -> list[str]:
    """`candidates` ordered best first by `method` ("borda" or "ranked-pairs") from `rankings` (candidate ids,
    best first)."""
    if method == "borda":
        return borda(rankings, candidates)
    if method == "ranked-pairs":
        return ranked_pairs(rankings, candidates)
    raise ValueError(f"--merge must be one of {', '.join(MERGES)}, not {method!r}")


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


def ranked_pairs(rankings: list[list[str]], candidates: list[str]) -> list[str]:
    """Merge rankings (lists of candidate ids, best first) into one order of `candidates`, best first, by Tideman's
    ranked pairs (see the module docstring for the counting and the tie-breaks)."""
    tie_break = borda(rankings, candidates)
    place = {c: i for i, c in enumerate(tie_break)}
    above = defaultdict(int)  # (x, y) -> labellers who put x above y
    for ranking in rankings:
        for i, x in enumerate(ranking):
            for y in ranking[i + 1:]:
                above[x, y] += 1
    victories = []  # (margin, votes for the winner, winner, loser)
    for x, y in combinations(candidates, 2):
        if above[x, y] != above[y, x]:
            winner, loser = (x, y) if above[x, y] > above[y, x] else (y, x)
            victories.append((above[winner, loser] - above[loser, winner], above[winner, loser], winner, loser))
    victories.sort(key=lambda v: (-v[0], -v[1], place[v[2]], place[v[3]]))
    beats: dict[str, set[str]] = defaultdict(set)  # the locked graph: winner -> losers
    for _, _, winner, loser in victories:
        if not _reaches(beats, loser, winner):
            beats[winner].add(loser)
    order, left = [], list(tie_break)
    while left:
        beaten = {loser for c in left for loser in beats[c]}
        best = next(c for c in left if c not in beaten)  # a locked graph has no cycle: someone is unbeaten
        order.append(best)
        left.remove(best)
    return order


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether a path of locked victories leads from `start` to `goal`."""
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(graph[node])
    return False


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
