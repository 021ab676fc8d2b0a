"""The escalation benchmark's offline sweep and its RESULTS.md section writer."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.escalation import report, sweep


def brute_force_expected(run: sweep.Pass, k: int) -> float:
    """Average over every tie-breaking order of the k least confident items."""
    n = run.n
    orders = itertools.permutations(range(n))
    accs = []
    for order in orders:
        ranked = sorted(order, key=lambda i: run.confidence[i])  # stable: order breaks ties
        chosen = set(ranked[:k])
        accs.append(sum(run.expert_correct[i] if i in chosen else run.primary_correct[i]
                        for i in range(n)) / n)
    return sum(accs) / len(accs)


@given(st.lists(st.tuples(st.sampled_from([0.1, 0.5, 0.9]), st.booleans(), st.booleans()),
                min_size=1, max_size=5), st.integers(0, 5))
def test_confidence_sweep_matches_brute_force_with_ties(rows, k) -> None:
    run = sweep.Pass.of(*zip(*rows, strict=True))
    assert sweep.accuracy_by_confidence(run, k) == pytest.approx(brute_force_expected(run, k))


def test_endpoints_and_random_and_oracle() -> None:
    rng = random.Random(0)
    conf = [rng.random() for _ in range(50)]
    primary = [c > 0.5 for c in conf]  # a perfectly ranked primary
    expert = [True] * 50
    run = sweep.Pass.of(conf, primary, expert)
    assert sweep.accuracy_by_confidence(run, 0) == pytest.approx(sum(primary) / 50)
    assert sweep.accuracy_by_confidence(run, 50) == 1.0
    wrong = 50 - sum(primary)
    assert sweep.accuracy_by_confidence(run, wrong) == 1.0 == sweep.accuracy_oracle(run, wrong)
    assert sweep.accuracy_random(run, 25) == pytest.approx(0.5 * sum(primary) / 50 + 0.5)


def test_threshold_for_rate_escalates_that_many() -> None:
    conf = [0.1, 0.2, 0.3, 0.4, 0.5]
    t = sweep.threshold_for_rate(conf, 0.4)
    assert sum(c < t for c in conf) == 2


def test_write_section_replaces_only_routing(tmp_path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# R\n\n## server\n\nS1\n\n## routing\n\nold\n\n## merge\n\nM\n")
    report.write_section(md, "new body")
    text = md.read_text()
    assert "old" not in text and "new body" in text and "S1" in text and "\n## merge\n\nM" in text
    assert text.count("## routing") == 1
    report.write_section(md, "newer")
    assert md.read_text().count("## routing") == 1 and "newer" in md.read_text()
    fresh = tmp_path / "none.md"
    report.write_section(fresh, "x")
    assert "## routing\n\nx" in fresh.read_text()
