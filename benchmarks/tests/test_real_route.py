"""The real-route benchmark's arithmetic (escalation curves, the certified route) and its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.guarantee.predictions import Tier
from benchmarks.guarantee.real_route import RATES, curves, guaranteed_route, main


def _tier(name: str, score: list[float], correct: list[int]) -> Tier:
    return Tier(name, np.asarray(score, float), np.asarray(correct, bool))


def test_curves_by_hand() -> None:
    # primary right on items 0 and 1; expert right on 1, 2 and 3
    primary = _tier("p", [0.9, 0.2, 0.1, 0.8], [1, 1, 0, 0])
    expert = _tier("e", [0.5] * 4, [0, 1, 1, 1])
    out = curves(primary, expert, rates=(0.0, 0.25, 0.5, 0.75, 1.0))
    # least confident first: item 2 (gain), then 1 (tie), then 3 (gain), then 0 (loss)
    assert out["calibrated route"] == [0.5, 0.75, 0.75, 1.0, 0.75]
    assert out["random"] == pytest.approx([0.5, 0.5625, 0.625, 0.6875, 0.75])
    # oracle: the two gains first, then the tie, then the loss
    assert out["oracle"] == [0.5, 0.75, 1.0, 1.0, 0.75]


def test_a_perfect_ranking_routes_like_the_oracle_when_the_expert_is_always_right() -> None:
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.6
    primary = _tier("p", list(np.where(correct, 0.6, 0.4) + rng.random(200) * 0.1),
                    list(correct.astype(int)))
    expert = _tier("e", [0.9] * 200, [1] * 200)
    out = curves(primary, expert)
    assert out["calibrated route"] == pytest.approx(out["oracle"])
    assert out["calibrated route"][RATES.index(0.2)] > out["random"][RATES.index(0.2)]


def test_the_certified_route_keeps_errors_under_alpha_on_separable_data() -> None:
    rng = np.random.default_rng(2)
    score = rng.random(900)
    correct = rng.random(900) < (1 + score) / 2  # kept error above t is (1 - t) / 4
    g = guaranteed_route(_tier("p", list(score), list(correct.astype(int))),
                         _tier("e", [0.5] * 900, [1] * 900), alpha=0.2, delta=0.1)
    assert g["certified"] and g["n_calibrate"] == 600 and g["n_test"] == 300
    assert g["test_kept_error"] <= 0.2 + 0.05
    # everything escalated is answered right by this expert, so the route beats the primary
    assert g["test_route_accuracy"] > g["test_primary_accuracy"]


def _table(root: Path, row: str, answers: list[tuple[int, str, float]]) -> Path:
    rows = root / "rows" / row
    rows.mkdir(parents=True)
    (rows / "answers.jsonl").write_text("".join(
        json.dumps({"i": i, "reply": reply, "confidence": {"score": c, "calibrated": True}})
        + "\n" for i, reply, c in answers))
    return root


def test_main_writes_results_and_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    items = tmp_path / "short_test.jsonl"
    n = 60
    items.write_text("".join(json.dumps({"question": f"q{i}", "answer": "Japan"}) + "\n"
                             for i in range(n)))
    right = rng.random(n) < 0.5
    p = _table(tmp_path / "p", "small", [(i, "Japan" if right[i] else "Peru",
                                          float(0.7 if right[i] else 0.3)) for i in range(n)])
    e = _table(tmp_path / "e", "big", [(i, "Japan.", 0.9) for i in range(n - 5)])
    out = tmp_path / "out"
    assert main(["--primary", f"{p}:small", "--expert", f"{e}:big", "--items", str(items),
                 "--splits", "20", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["items"] == n - 5  # only the items both answered
    assert result["accuracy"]["expert"] == 1.0
    assert result["curves"]["calibrated route"][-1] == 1.0
    assert (out / "escalation.png").stat().st_size > 1000


def test_main_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--primary", f"{tmp_path}:a", "--expert", f"{tmp_path}:b",
                 "--items", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "missing answers or items" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_route_of_three_answers_by_the_first_tier_that_keeps() -> None:
    from benchmarks.guarantee.real_route import _route_outcome

    tiers = [_tier("p", [0.9, 0.1, 0.1, 0.1], [1, 0, 0, 0]),
             _tier("m", [0.0, 0.8, 0.2, 0.9], [0, 1, 0, 0]),
             _tier("e", [0.0] * 4, [1, 1, 1, 1])]
    out = _route_outcome(tiers, [0.5, 0.5, 0.0], np.arange(4))
    # item 0: primary keeps (right); 1 and 3: the middle keeps (right, wrong); 2: the expert
    assert out["answered_by"] == [1, 2, 1]
    assert (out["kept"], out["kept_errors"], out["kept_error"]) == (3, 1, pytest.approx(1 / 3))
    assert out["route_accuracy"] == 0.75
    none = _route_outcome(tiers, [float("inf"), float("inf"), 0.0], np.arange(4))
    assert none["answered_by"] == [0, 0, 4] and none["kept_error"] is None


def test_the_certified_route_of_three_holds_on_separable_data() -> None:
    from benchmarks.guarantee.real_route import three_tier_route

    rng = np.random.default_rng(4)
    n = 900
    tiers = []
    for name, lift in (("p", 0.0), ("m", 0.15), ("e", 0.3)):
        score = rng.random(n)
        tiers.append(_tier(name, list(score), list(
            (rng.random(n) < np.clip(0.2 + score + lift, 0, 1)).astype(int))))  # top: right
    r = three_tier_route(tiers, alpha=0.2, delta=0.1, splits=60)
    s = r["seeded"]
    assert s["certified"][:2] == [True, True] and sum(s["answered_by"]) == s["n_test"] == 300
    assert s["kept"] == sum(s["answered_by"][:2]) and s["kept_error"] <= 0.2 + 0.05
    assert r["resplits"]["violations"] <= 0.25 and r["resplits"]["middle_certified"] == 60
