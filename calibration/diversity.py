"""Diversity of a set of generations (alignment tends to make replies more alike).

Both measures split texts on whitespace, case-sensitively, with no other normalisation.
- `distinct_n(texts, n)`: unique n-grams / total n-grams, pooled over all texts (in [0, 1];
  higher = more diverse). 0.0 when there are no n-grams at all.
- `pairwise_jaccard(texts)`: mean over all pairs of texts of the Jaccard SIMILARITY of their
  token sets, |A & B| / |A | B| (in [0, 1]; lower = more diverse). Two empty texts count as
  identical (1.0); fewer than two texts give 0.0 (no pair is alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

__all__ = ["distinct_n", "pairwise_jaccard"]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams over total n-grams of whitespace tokens, across all texts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def pairwise_jaccard(texts: Sequence[str]) -> float:
    """Mean pairwise Jaccard similarity of token sets (lower = more diverse)."""
    sets = [frozenset(t.split()) for t in texts]
    if len(sets) < 2:
        return 0.0
    total = 0.0
    pairs = 0
    for a, b in combinations(sets, 2):
        union = len(a | b)
        total += len(a & b) / union if union else 1.0
        pairs += 1
    return total / pairs
