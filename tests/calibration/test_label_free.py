"""DACA's label-free option temperature (calibration/label_free.py), the document's `fit.labels`
and the served `confidence.calibration`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibserve.calibration import (
    CalibrationDocument,
    CalibrationError,
    DegenerateDataError,
    OptionTemperature,
    Scorer,
    answer_confidence,
)
from calibserve.calibration.confidence import confidence_json
from calibserve.calibration.label_free import agreement, fit_daca, fit_daca_temperature


def _logits(n: int, k: int = 4, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, k)) * scale


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


@pytest.mark.parametrize("t_star", [0.4, 1.0, 2.3, 9.0])
def test_base_equal_to_the_tempered_aligned_distribution_gives_that_temperature(
        t_star: float) -> None:
    """CE(p, softmax(z / T)) is minimised where softmax(z / T) = p: with the base's
    distribution exactly softmax(z / T*), every item agrees and T = T*."""
    z = _logits(300)
    base = _log_softmax(z / t_star) + 5.0  # logprobs or logits: a row constant cancels
    fit = fit_daca(z, base)
    assert fit.temperature == pytest.approx(t_star, rel=1e-5)
    assert (fit.n, fit.n_agree, fit.agreement) == (300, 300, 1.0)
    assert fit_daca_temperature(z, base) == fit.temperature


def test_several_tokens_per_option_are_tempered_as_served() -> None:
    """Two tokens per option (`A`, `▁A`): the served formula divides each token's logprob by T
    and adds the option's tokens up (`answer_confidence`). A base distribution made with that
    formula at T* gives back T*."""
    rng = np.random.default_rng(1)
    z = -np.abs(rng.normal(size=(200, 8))) * 2.5 - 0.1  # logprobs: never above 0
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    t_star = 3.1
    per_option = np.stack([np.logaddexp(z[:, 2 * j] / t_star, z[:, 2 * j + 1] / t_star)
                           for j in range(4)], axis=1)
    fit = fit_daca(z, per_option, groups, base_groups=np.arange(4))
    assert fit.temperature == pytest.approx(t_star, rel=1e-5)
    # ... which is the temperature `answer_confidence` serves the same probability with.
    tokens = ["A", "\u2581A", "B", "\u2581B", "C", "\u2581C", "D", "\u2581D"]
    row = dict(zip(tokens, z[0].tolist(), strict=True))
    served = answer_confidence(row, "B", ("A", "B", "C", "D"), temperature=fit.temperature)
    assert served == pytest.approx(math.exp(_log_softmax(per_option)[0, 1]), rel=1e-5)


def test_disagreeing_items_are_left_out_of_the_fit() -> None:
    """Half the items agree with the base at T* = 2; on the other half the base is sure of
    another option. Those change nothing: the fit equals the fit on the agreeing half alone,
    and it is T*; fitting on every item (the paper's naive alignment) gives a larger T, the
    under-confidence DACA avoids."""
    z = _logits(400, seed=2)
    base = _log_softmax(z / 2.0)
    pred = z.argmax(axis=1)
    wrong = (pred + 1) % 4
    bad = np.arange(200, 400)
    base[bad] = np.log(0.02)
    base[bad, wrong[bad]] = np.log(0.94)
    mask = agreement(z, base)
    assert mask[:200].all() and not mask[200:].any()
    fit = fit_daca(z, base)
    assert (fit.n, fit.n_agree, fit.n_usable) == (400, 200, 400)
    assert fit.agreement == 0.5
    assert fit.temperature == fit_daca(z[:200], base[:200]).temperature
    assert fit.temperature == pytest.approx(2.0, rel=1e-5)
    naive = fit_daca(z, base, agreement_only=False)
    assert naive.n_agree == 400 and naive.temperature > 2.5


def test_the_minimiser_is_that_of_the_released_code_loss() -> None:
    """The released loss (clamped softmaxes, mean over every row with disagreeing rows as
    zeros) evaluated on a grid of T has its minimum where the fitted T is."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 4)) * 3.0
    base = rng.normal(size=(300, 4)) * 1.5 + z / 4.0  # related, not a tempered copy

    def code_loss(t: float) -> float:
        def softmax(x: np.ndarray) -> np.ndarray:
            return np.exp(_log_softmax(x))
        tuned = np.clip(softmax(z / t), 1e-8, 1 - 1e-8)
        pre = softmax(base)
        mask = softmax(z).argmax(1) == pre.argmax(1)
        pre = np.clip(pre, 1e-8, 1 - 1e-8)
        per = np.where(mask[:, None], -pre * np.log(tuned), 0.0).sum(1)
        return float(per.mean())

    grid = np.exp(np.linspace(np.log(0.1), np.log(50.0), 4001))
    best = grid[np.argmin([code_loss(t) for t in grid])]
    fitted = fit_daca_temperature(z, base)
    assert fitted == pytest.approx(best, rel=2e-3)
    assert fitted != pytest.approx(1.0, abs=0.05)


def test_absent_options_and_the_vllm_floor() -> None:
    """An option the aligned model never gives (-inf) while the base does is a term with no T
    in it: left out. The rest of the row is still matched (renormalised over the options the
    aligned model has, the base's softmax(z / T*) is still softmax(z / T*)), so T = T*.
    vLLM's -9999 is absent too; an item where one model has no option at all is not usable."""
    z = _logits(100, seed=4)
    base = _log_softmax(z / 1.7)
    z_gap = z.copy()
    z_gap[:10, 3] = -np.inf
    z_gap[10:20, 3] = -9999.0
    keep = z_gap.argmax(1) == base.argmax(1)
    fit = fit_daca(z_gap, base)
    assert fit.n_agree == int(keep.sum()) < 100
    assert fit.temperature == pytest.approx(1.7, rel=1e-5)
    empty = z.copy()
    empty[0] = -np.inf
    assert fit_daca(empty, base).n_usable == 99


def test_no_agreement_is_degenerate() -> None:
    z = _logits(20, seed=5)
    base = -z  # always another option
    with pytest.raises(DegenerateDataError, match="none of the 20"):
        fit_daca(z, base)
    with pytest.raises(DegenerateDataError, match="differ in length"):
        fit_daca(z, base[:5])


# --- the document and what is served ----------------------------------------------------------


def _document(labels: str | None, temperature: float = 2.5) -> CalibrationDocument:
    fit: dict[str, object] = {"n": 100, "ece_raw": 0.2, "ece_calibrated": 0.05}
    if labels is not None:
        fit["labels"] = labels
    if labels == "none":
        fit.update(agreement=0.7, n_agree=70, reference="base")
    return CalibrationDocument.from_dict({
        "version": 2,
        "methods": {"answer": {"params": {"options": list("ABCD"), "temperature": temperature},
                               "calibrator": {"type": "identity"}, "fit": fit},
                    "mean": {}},
        "multiple_choice": "answer", "free_form": "mean"})


def test_fit_labels_round_trip_and_older_documents_load() -> None:
    doc = _document("none")
    fit = doc.method("answer").fit
    assert fit is not None and fit.labels == "none" and fit.label_free
    assert (fit.agreement, fit.n_agree, fit.reference) == (0.7, 70, "base")
    again = CalibrationDocument.from_dict(doc.to_dict())
    assert again == doc and again.to_dict()["methods"]["answer"]["fit"]["labels"] == "none"
    old = _document(None)  # written before the field: a labelled fit
    assert old.method("answer").fit.labels is None  # type: ignore[union-attr]
    assert not old.method("answer").label_free
    assert "labels" not in old.to_dict()["methods"]["answer"]["fit"]
    with pytest.raises(CalibrationError, match="labels"):
        _document("some")
    bad = _document("none").to_dict()
    bad["methods"]["answer"]["fit"]["agreement"] = 1.5
    with pytest.raises(CalibrationError, match="agreement"):
        CalibrationDocument.from_dict(bad)


LOGPROBS = {"content": [{"token": "B", "logprob": -0.05, "top_logprobs": [
    {"token": "B", "logprob": -0.05}, {"token": "A", "logprob": -3.5},
    {"token": "C", "logprob": -4.0}, {"token": "D", "logprob": -5.0}]}]}


def test_a_label_free_map_is_served_saying_so() -> None:
    conf = Scorer.from_document(_document("none")).score_choice(LOGPROBS, True)
    assert conf.method == "answer" and conf.calibrated and conf.calibration == "label-free"
    expected = OptionTemperature(2.5).confidence([[-3.5, -0.05, -4.0, -5.0]], [1])[0]
    assert conf.score == pytest.approx(expected)
    assert conf.to_dict()["calibration"] == "label-free"
    assert confidence_json(conf) == {"score": conf.score, "raw": conf.raw, "method": "answer",
                                     "calibrated": True, "calibration": "label-free"}
    for labels in ("gold", None):  # a labelled map: the block keeps its four fields
        served = Scorer.from_document(_document(labels)).score_choice(LOGPROBS, True)
        assert served.calibrated and served.calibration is None
        assert set(confidence_json(served)) == {"score", "raw", "method", "calibrated"}
    # T = 1 and the identity: no map at all, so nothing to say about how it was fitted.
    raw = Scorer.from_document(_document("none", 1.0)).score_choice(LOGPROBS, True)
    assert not raw.calibrated and "calibration" not in confidence_json(raw)
    # Free-form replies are scored by `mean`, which has no map: not labelled label-free.
    free = Scorer.from_document(_document("none")).score_choice(
        {"content": [{"token": "blue", "logprob": -0.2, "top_logprobs": []}]}, False)
    assert free.method == "mean" and free.calibration is None
