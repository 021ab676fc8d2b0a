"""The multi-class option temperature and the choice of calibrator family by held-out log loss."""

from __future__ import annotations

import numpy as np
import pytest

from calibserve.calibration import (
    N_BINS,
    CalibrationDocument,
    FitMetrics,
    MethodCalibration,
    MethodParams,
    OptionLogits,
    OptionTemperature,
    Scorer,
    answer_confidence,
    choose_calibrator,
    ece,
)
from calibserve.calibration.errors import CalibrationError, DegenerateDataError

LETTERS = ("A", "B", "C", "D")


def _world(
    n: int, true_t: float, seed: int = 0, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Option logprobs whose model is over-confident by `true_t`: gold ~ softmax(z / true_t)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, size=(n, 4))
    p_true = np.exp(z / true_t)
    p_true /= p_true.sum(axis=1, keepdims=True)
    gold = np.array([rng.choice(4, p=row) for row in p_true])
    logprobs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pred = logprobs.argmax(axis=1)
    return logprobs, gold, pred


def _options(lp: np.ndarray, gold: np.ndarray, pred: np.ndarray) -> OptionLogits:
    return OptionLogits(lp, np.arange(lp.shape[1]), pred.astype(np.intp), gold.astype(np.intp))


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_option_temperature_recovers_known_t(true_t: float) -> None:
    lp, gold, _ = _world(4000, true_t)
    fitted = OptionTemperature().fit(lp, gold).temperature
    assert fitted == pytest.approx(true_t, rel=0.1)


def test_option_temperature_reaches_below_one_half() -> None:
    # Right ~35% of the time at confidence 0.9: the binary map cannot go below 0.5, this can
    # (down to 1/k, chance; a model below chance needs a scalar map such as Platt on top).
    rng = np.random.default_rng(1)
    n = 2000
    pred = rng.integers(0, 4, n)
    lp = np.full((n, 4), np.log(0.1 / 3))
    lp[np.arange(n), pred] = np.log(0.9)
    gold = np.where(rng.random(n) < 0.35, pred, (pred + rng.integers(1, 4, n)) % 4)
    correct = gold == pred
    opt = OptionTemperature().fit(lp, gold)
    conf = opt.confidence(lp, pred)
    assert conf.mean() == pytest.approx(correct.mean(), abs=0.03)
    assert ece(conf, correct) < 0.05
    choice = choose_calibrator(np.full(n, 0.9), correct,
                               _options(lp, gold, pred))
    assert choice.held_out_ece["temperature"] > 0.13  # stuck at >= 0.5 against 0.35
    assert choice.held_out_ece[choice.family] < 0.06


def test_option_temperature_matches_answer_confidence_with_token_groups() -> None:
    # Two tokens name "A" (`A`, `▁A`): per-token division by T, then the option's tokens add up.
    lp = np.array([[-0.3, -2.0, -1.5, -3.0, -9999.0], [-2.5, -0.7, -1.1, -np.inf, -4.0]])
    tokens = ["A", "▁A", "B", "C", "D"]
    groups = np.array([0, 0, 1, 2, 3])
    pred = np.array([0, 2])
    t = 1.7
    got = OptionTemperature(t).confidence(lp, pred, groups)
    for i in range(2):
        top = dict(zip(tokens, lp[i].tolist(), strict=True))
        want = answer_confidence(top, LETTERS[pred[i]], LETTERS, temperature=t)
        assert got[i] == pytest.approx(want, abs=1e-12)


def test_option_temperature_round_trip_and_errors() -> None:
    opt = OptionTemperature(2.5)
    assert OptionTemperature.from_dict(opt.to_dict()) == opt
    assert opt.to_dict() == {"type": "option_temperature", "temperature": 2.5}
    with pytest.raises(CalibrationError):
        OptionTemperature.from_dict({"type": "temperature", "temperature": 2.0})
    with pytest.raises(CalibrationError):
        OptionTemperature(-1.0)
    with pytest.raises(DegenerateDataError):
        OptionTemperature().fit(np.zeros((3, 1)), np.zeros(3, dtype=int))


def _scalar_world(n: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.05, 0.95, n)
    if kind == "calibrated":
        p = conf
    elif kind == "overconfident":  # a true temperature: sigmoid(logit(c) / 3)
        p = 1 / (1 + np.exp(-np.log(conf / (1 - conf)) / 3))
    else:  # a step no smooth family follows: right half the time up to 0.5, then always
        p = np.where(conf < 0.5, 0.5, 1.0)
    return conf, rng.random(n) < p


# 600 items, about a calibrate split: the size at which the one-standard-error rule matters.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_choice_keeps_the_identity_on_calibrated_data(seed: int) -> None:
    conf, y = _scalar_world(600, "calibrated", seed)
    choice = choose_calibrator(conf, y)
    assert set(choice.held_out_ece) == {"identity", "temperature", "platt", "histogram",
                                        "isotonic"}
    # Whichever family wins on a proper score, what it serves is (nearly) the raw confidence.
    grid = np.linspace(0.05, 0.95, 19)
    assert np.max(np.abs(choice.apply(grid) - grid)) < 0.06
    assert choice.family in {"identity", "temperature", "platt"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_choice_prefers_a_smooth_map_on_a_true_temperature(seed: int) -> None:
    conf, y = _scalar_world(600, "overconfident", seed)
    choice = choose_calibrator(conf, y)
    assert choice.family in {"temperature", "platt"}
    assert choice.held_out_ece["identity"] > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_choice_prefers_a_nonparametric_map_on_a_step(seed: int) -> None:
    conf, y = _scalar_world(600, "step", seed)
    choice = choose_calibrator(conf, y)
    assert choice.family in {"histogram", "isotonic"}
    assert choice.held_out_ece[choice.family] < choice.held_out_ece["platt"]


def test_family_choice_picks_option_temperature_on_option_data() -> None:
    lp, gold, pred = _world(3000, 0.4, seed=3)  # under-confident: sharpen by 1/0.4
    conf = np.exp(lp[np.arange(lp.shape[0]), pred])
    choice = choose_calibrator(conf, gold == pred, _options(lp, gold, pred))
    assert choice.family == "option_temperature"
    assert choice.temperature == pytest.approx(0.4, rel=0.15)
    assert "option_temperature" in choice.held_out_ece
    served = choice.apply(conf, _options(lp, gold, pred))
    assert ece(served, gold == pred) < ece(conf, gold == pred)


def test_family_choice_is_seeded_and_handles_degenerate_labels() -> None:
    conf, y = _scalar_world(500, "overconfident")
    assert choose_calibrator(conf, y, seed=7) == choose_calibrator(conf, y, seed=7)
    allwrong = choose_calibrator(conf, np.zeros_like(y))
    # Only Platt's smoothed constant fits single-class data: near 0 for a model always wrong.
    assert allwrong.family == "platt"
    assert float(allwrong.calibrator.apply(0.9)) == pytest.approx(1 / 502)
    assert choose_calibrator(conf, np.zeros_like(y), families=["isotonic"]).family == "identity"
    few = choose_calibrator([0.3, 0.6, 0.9], [0, 1, 1])
    assert few.family == "identity" and few.held_out_ece == {}
    only = choose_calibrator(conf, y, families=["platt"])
    assert only.family == "platt"
    with pytest.raises(CalibrationError):
        choose_calibrator(conf, y, families=["nope"])


def _answer_doc(temperature: float, calibrator: dict[str, object] | None) -> CalibrationDocument:
    fit = FitMetrics(n=10, ece_raw=0.3, ece_calibrated=0.02, calibrator="option_temperature",
                     held_out_ece={"identity": 0.3, "option_temperature": 0.02},
                     selection="5-fold cross-validation (seed 0)")
    return CalibrationDocument(
        methods={"answer": MethodCalibration(
            params=MethodParams(options=list(LETTERS), temperature=temperature),
            calibrator=calibrator, fit=fit), "mean": MethodCalibration()},
        multiple_choice="answer", free_form="mean")


def test_document_round_trip_of_family_fields() -> None:
    doc = _answer_doc(2.0, {"type": "identity"})
    again = CalibrationDocument.from_dict(doc.to_dict())
    assert again == doc
    fit = again.method("answer").fit
    assert fit is not None and fit.calibrator == "option_temperature"
    assert fit.held_out_ece == {"identity": 0.3, "option_temperature": 0.02}
    # The identity on top of a fitted option temperature is a map of the method's own.
    assert again.method("answer").calibrated
    assert not _answer_doc(1.0, {"type": "identity"}).method("answer").calibrated
    # v1 with an identity calibrator stays "no map" whatever its temperature.
    v1 = CalibrationDocument.from_dict({"version": 1, "confidence": {
        "method": "answer", "temperature": 2.0}, "calibrator": {"type": "identity"}})
    assert not v1.method("answer").calibrated


def test_served_scorer_reproduces_the_option_temperature_fit() -> None:
    lp, gold, pred = _world(600, 0.5, seed=5)
    conf = np.exp(lp[np.arange(lp.shape[0]), pred])
    opts = _options(lp, gold, pred)
    choice = choose_calibrator(conf, gold == pred, opts, families=["option_temperature"])
    doc = _answer_doc(choice.temperature, choice.calibrator.to_dict())
    scorer = Scorer.from_document(CalibrationDocument.from_dict(doc.to_dict()))
    fitted = choice.apply(conf, opts)
    for i in range(0, 600, 37):
        top = [{"token": t, "logprob": float(v)} for t, v in zip(LETTERS, lp[i], strict=True)]
        choice_lp = {"content": [{"token": LETTERS[pred[i]], "logprob": float(lp[i, pred[i]]),
                                  "top_logprobs": top}]}
        got = scorer.score_choice(choice_lp)
        assert got.method == "answer" and got.calibrated
        assert got.score == pytest.approx(fitted[i], abs=1e-9)
    assert N_BINS == 15


def test_a_constant_map_loses_where_ece_and_log_loss_disagree() -> None:
    # Every confidence in the top ECE bin (14/15 to 1), yet informative inside it. Histogram
    # binning serves one value there: ECE (same bins) calls it perfect; it has no information.
    assert N_BINS == 15
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.94, 1.0, 1500)
    y = rng.random(conf.size) < (conf - 0.94) / 0.06
    choice = choose_calibrator(conf, y)
    held = choice.held_out
    assert held["histogram"].ece < held[choice.family].ece  # ECE prefers the constant ...
    assert held["histogram"].log_loss > held[choice.family].log_loss + 0.05  # log loss does not
    assert held["histogram"].auroc == pytest.approx(0.5, abs=0.02)
    assert choice.family in {"platt", "isotonic"}


def test_a_map_that_flattens_the_ranking_is_refused() -> None:
    # Every confidence in the top bin, yet informative inside it: histogram binning serves one
    # value (AUROC 0.5) and is refused, whatever its log loss.
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.94, 1.0, 1500)
    y = rng.random(conf.size) < (conf - 0.94) / 0.06
    choice = choose_calibrator(conf, y)
    hist = choice.held_out["histogram"]
    assert hist.refused is not None and "AUROC" in hist.refused
    assert choice.family != "histogram"
    assert any(n.startswith("histogram refused") for n in choice.notes)
    # Forced, a family is fitted whatever auto would say (its scores still recorded).
    assert choose_calibrator(conf, y, families=["histogram"]).family == "histogram"


def test_piecewise_maps_need_samples_in_every_bin() -> None:
    conf, y = _scalar_world(120, "step", 0)  # 96 training samples a fold: < 20 per bin
    choice = choose_calibrator(conf, y)
    assert "samples" in (choice.held_out["isotonic"].refused or "")
    assert "samples" in (choice.held_out["histogram"].refused or "")
    assert choice.family not in {"histogram", "isotonic"}


def test_folds_group_the_items_of_one_question() -> None:
    # Each question asked 4 times with the same raw confidence and the same answer: ungrouped
    # folds put copies on both sides and the fit grades itself on what it memorised.
    from calibserve.calibration.family import _fold_of

    questions = np.repeat(np.arange(150), 4)
    folds = _fold_of(questions.size, questions, 5, seed=0)
    for q in range(150):
        assert np.unique(folds[questions == q]).size == 1
    assert np.bincount(folds).tolist() == [120] * 5
    conf, y = _scalar_world(150, "calibrated", 1)
    choice = choose_calibrator(np.repeat(conf, 4), np.repeat(y, 4),
                               questions=[f"q{q}" for q in questions])
    assert "grouped by question (150 questions)" in choice.selection
    with pytest.raises(CalibrationError):
        choose_calibrator(conf, y, questions=["q"] * 3)


def test_auroc_standard_error_matches_hanley_mcneil() -> None:
    from calibserve.calibration.family import auroc_standard_error

    # Hanley and McNeil (1982), Table 1-style check: A = 0.9, 50 positives, 50 negatives.
    q1, q2 = 0.9 / 1.1, 2 * 0.81 / 1.9
    want = np.sqrt((0.9 * 0.1 + 49 * (q1 - 0.81) + 49 * (q2 - 0.81)) / 2500)
    assert auroc_standard_error(0.9, 50, 50) == pytest.approx(want)
    assert np.isnan(auroc_standard_error(0.9, 0, 50))
