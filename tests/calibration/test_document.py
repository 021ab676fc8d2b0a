"""The typed calibration document: v1 to v2, round-trip, refusals, what the Scorer makes of it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from calibserve.calibration import (
    CalibrationDocument,
    CalibrationError,
    MethodCalibration,
    MethodParams,
    Scorer,
    TemperatureScaling,
    Threshold,
)

V1: dict[str, Any] = {
    "version": 1,
    "confidence": {
        "method": "answer",
        "options": ["A", "B", "C"],
        "temperature": 1.0,
        "fallback": "mean",
    },
    "calibrator": {"type": "temperature", "temperature": 1.7},
    "thresholds": [
        {"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.55, "accuracy": 0.81},
        {"target_accuracy": 0.9, "threshold": 0.8, "coverage": 0.3},
    ],
    "merge": {"lambda": 0.3, "method": "linear", "base": "b", "aligned": "a",
              "rule": "max-accuracy"},
    "metrics": {
        "calibrate": {"ece_raw": 0.12, "ece_calibrated": 0.03, "n": 400,
                      "unreachable_targets": [0.95]},
        "test": {"accuracy": 0.7, "ece": 0.05},
    },
}

V2_OF_V1: dict[str, Any] = {
    "version": 2,
    "methods": {
        "answer": {
            "params": {"options": ["A", "B", "C"], "temperature": 1.0},
            "calibrator": {"type": "temperature", "temperature": 1.7},
            "thresholds": [
                {"target_accuracy": 0.8, "threshold": 0.63, "coverage": 0.55, "accuracy": 0.81},
                {"target_accuracy": 0.9, "threshold": 0.8, "coverage": 0.3},
            ],
            "fit": {"n": 400, "ece_raw": 0.12, "ece_calibrated": 0.03,
                    "unreachable_targets": [0.95]},
        },
        "mean": {"params": {}, "calibrator": None, "thresholds": [], "fit": None},
    },
    "multiple_choice": "answer",
    "free_form": "mean",
    "merge": {"lambda": 0.3, "method": "linear", "base": "b", "aligned": "a",
              "rule": "max-accuracy"},
    "metrics": {"test": {"accuracy": 0.7, "ece": 0.05}},
}


def mc_reply(letter: str, p: float) -> dict[str, Any]:
    other = "A" if letter != "A" else "B"
    top = [{"token": letter, "logprob": math.log(p)},
           {"token": other, "logprob": math.log(1 - p)}]
    return {"content": [{"token": letter, "logprob": math.log(p), "top_logprobs": top}]}


FREE_FORM_REPLY: dict[str, Any] = {
    "content": [
        {"token": "The", "logprob": -0.5,
         "top_logprobs": [{"token": "The", "logprob": -0.5}, {"token": "It", "logprob": -1.5}]},
        {"token": " end", "logprob": -1.5, "top_logprobs": []},
    ]
}


# --- version 1 ---------------------------------------------------------------------------------

def test_v1_loads_as_v2_with_exact_values() -> None:
    doc = CalibrationDocument.from_dict(V1)
    assert doc.to_dict() == V2_OF_V1
    assert doc.version == 2 and doc.merge is not None and doc.merge.lambda_ == 0.3
    answer = doc.method()
    assert answer.calibrated and answer.calibration_map() == TemperatureScaling(1.7)
    assert answer.thresholds[0] == Threshold(target_accuracy=0.8, threshold=0.63, coverage=0.55,
                                             accuracy=0.81)
    assert answer.fit is not None and answer.fit.n == 400
    assert not doc.method("mean").calibrated  # the fallback gets no calibrator of its own
    assert (doc.options(), doc.temperature()) == (("A", "B", "C"), 1.0)


def test_v1_defaults_and_the_quantile_method() -> None:
    bare = CalibrationDocument.from_dict({})  # v1 files may predate `version`
    assert bare.to_dict() == {
        "version": 2,
        "methods": {"mean": {"params": {}, "calibrator": None, "thresholds": [], "fit": None}},
        "multiple_choice": "mean", "free_form": "mean", "merge": None, "metrics": {},
    }
    q = CalibrationDocument.from_dict({"confidence": {"method": "quantile", "q": 0.25,
                                                      "fallback": "quantile"}})
    assert q.method("quantile").params == MethodParams(quantile=0.25)
    assert list(q.methods) == ["quantile"] and q.quantile() == 0.25
    # Same method for both roles: its calibrator serves both (it was fitted on its own scores).
    mean = CalibrationDocument.from_dict({"confidence": {"method": "mean"},
                                          "calibrator": {"type": "temperature", "temperature": 3}})
    assert list(mean.methods) == ["mean"] and mean.method("mean").calibrated


def test_v1_empty_calibrator_and_identity_are_no_map() -> None:
    for cal in ({}, None, {"type": "identity"}):
        doc = CalibrationDocument.from_dict({"confidence": {"method": "answer"}, "calibrator": cal})
        assert not doc.method().calibrated and doc.method().calibration_map() is None


# --- version 2: round trip and writing ----------------------------------------------------------

def test_v2_round_trips_through_write_and_load(tmp_path: Path) -> None:
    doc = CalibrationDocument.from_dict(V2_OF_V1)
    path = doc.write(tmp_path / "sub" / "calibration.json")
    assert path == tmp_path / "sub" / "calibration.json"
    assert json.loads(path.read_text()) == V2_OF_V1
    assert path.read_text() == doc.to_json() and doc.to_json().endswith("}\n")
    assert CalibrationDocument.load(path) == doc
    assert CalibrationDocument.load(path.parent) == doc  # a model directory works too
    assert doc.write(tmp_path / "sub") == path  # so does writing into one
    assert sorted(p.name for p in path.parent.iterdir()) == ["calibration.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = CalibrationDocument.from_dict(V1).write(tmp_path / "calibration.json")
    before = path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        CalibrationDocument.from_dict({}).write(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]


def test_built_in_code_writes_v2(tmp_path: Path) -> None:
    doc = CalibrationDocument(
        methods={"answer": MethodCalibration(
            params=MethodParams(options=["A", "B"], temperature=1.0),
            calibrator={"type": "platt", "a": 1.0, "b": 0.0}),
            "min": MethodCalibration()},
        multiple_choice="answer", free_form="min",
    )
    data = json.loads(doc.write(tmp_path / "c.json").read_text())
    assert data["version"] == 2 and data["free_form"] == "min" and data["merge"] is None


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_unknown_versions_are_refused_by_name(version: Any) -> None:
    with pytest.raises(CalibrationError, match=r"version .*supported versions: 1, 2") as info:
        CalibrationDocument.from_dict({**V2_OF_V1, "version": version})
    assert repr(version) in str(info.value)


def _v2(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(V2_OF_V1))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (_v2(methods__answer__thresholds__0__coverage=1.5),
         "methods.answer.thresholds.0.coverage"),
        (_v2(methods__answer__params__temperature="1.0"), "methods.answer.params.temperature"),
        (_v2(methods__answer__params__temperature=0), "methods.answer.params.temperature"),
        (_v2(methods__answer__calibrator={"type": "vibes"}), "methods.answer.calibrator"),
        (_v2(methods__answer__calibrater={"type": "platt"}), "methods.answer.calibrater"),
        (_v2(methods__answer__fit__n=-1), "methods.answer.fit.n"),
        (_v2(methods__mean__params__options=["A"]), "methods.mean.params"),
        (_v2(methods__vibes={}), "methods.vibes"),
        (_v2(multiple_choice="min"), "multiple_choice"),
        (_v2(free_form="answer"), "free_form"),
        (_v2(merge={"lambda": "0.3"}), "merge.lambda"),
        (_v2(thresholds=[]), "thresholds"),  # v2 keeps thresholds per method
        ({**V1, "confidence": {"method": "vibes"}}, "confidence.method"),
        ({**V1, "confidence": {"method": "answer", "fallback": "answer"}}, "confidence.fallback"),
        ({**V1, "thresholds": [{"target_accuracy": 0.8}]}, "thresholds.0.threshold"),
        ({**V1, "metrics": {"calibrate": {"n": 3}}}, "metrics.calibrate.ece_raw"),
    ],
)
def test_malformed_documents_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(CalibrationError, match="malformed calibration.json") as info:
        CalibrationDocument.from_dict(doc)
    assert field in str(info.value)


def test_load_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "calibration.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON") as info:
        CalibrationDocument.load(tmp_path)
    assert str(bad) in str(info.value)
    bad.write_text(json.dumps({"version": 7}))
    with pytest.raises(CalibrationError, match=f"{bad}: unsupported calibration.json version 7"):
        CalibrationDocument.load(bad)
    with pytest.raises(CalibrationError, match="JSON object"):
        CalibrationDocument.from_dict([])  # type: ignore[arg-type]


# --- the Scorer: each method through its own map only -------------------------------------------

def test_free_form_reply_without_its_own_map_is_uncalibrated() -> None:
    scorer = Scorer.from_document(CalibrationDocument.from_dict(V1))  # only `answer` has a map
    conf = scorer.score_choice(FREE_FORM_REPLY)
    assert conf.method == "mean" and not conf.calibrated
    assert conf.raw == pytest.approx(math.exp(-1.0)) and conf.score == conf.raw  # identity
    mc = scorer.score_choice(mc_reply("B", 0.8))
    assert mc.method == "answer" and mc.calibrated
    assert mc.score == pytest.approx(TemperatureScaling(1.7).apply(0.8))


def test_a_mean_map_of_its_own_is_applied_and_labelled() -> None:
    data = _v2(methods__mean__calibrator={"type": "temperature", "temperature": 2.0})
    scorer = Scorer.from_document(CalibrationDocument.from_dict(data))
    conf = scorer.score_choice(FREE_FORM_REPLY)
    assert conf.method == "mean" and conf.calibrated
    assert conf.score == pytest.approx(TemperatureScaling(2.0).apply(math.exp(-1.0)))
    assert conf.to_dict() == {"score": conf.score, "raw": conf.raw, "method": "mean",
                              "calibrated": True}
    # The option-letter reply still gets the `answer` map, not the `mean` one.
    mc = scorer.score_choice(mc_reply("A", 0.7))
    assert mc.score == pytest.approx(TemperatureScaling(1.7).apply(0.7))


def test_no_document_is_mean_identity_uncalibrated() -> None:
    for scorer in (Scorer.from_document(None), Scorer.from_config(None)):
        conf = scorer.score_choice(mc_reply("A", 0.7))
        assert (conf.method, conf.calibrated, conf.score) == ("mean", False, conf.raw)


def test_from_config_is_from_document() -> None:
    doc = CalibrationDocument.from_dict(V1)
    assert Scorer.from_config(V1) == Scorer.from_document(doc) == Scorer.from_config(doc)
    assert Scorer.from_config(V2_OF_V1) == Scorer.from_document(doc)


# --- certified thresholds: batch certificates ---------------------------------------------------

def _certified_doc(guarantee: dict[str, Any]) -> dict[str, Any]:
    return {"version": 2, "multiple_choice": "answer", "free_form": "mean",
            "methods": {"answer": {"guarantees": [guarantee]}, "mean": {}}}


def test_a_batch_certificate_round_trips(tmp_path: Path) -> None:
    import numpy as np

    from calibserve.calibration.document import Guarantee
    from calibserve.calibration.guarantee import batch_error_target, certify_threshold

    rng = np.random.default_rng(0)
    conf = rng.random(1500)
    cert = certify_threshold(conf, rng.random(1500) < (1 + conf) / 2, 0.2, 0.1, batch=100)
    g = Guarantee.from_certificate(cert)
    assert (g.batch, g.batch_target, g.target) == (100, cert.batch_target, cert.batch_target)
    assert g.bound <= batch_error_target(0.2, 0.1, 100) < g.max_error == 0.2
    path = CalibrationDocument.from_dict(_certified_doc(g.model_dump(mode="json"))).write(
        tmp_path / "calibration.json")
    raw = json.loads(path.read_text())["methods"]["answer"]["guarantees"][0]
    assert (raw["batch"], raw["batch_target"]) == (100, cert.batch_target)
    assert CalibrationDocument.load(path).method("answer").guarantee_for(0.2) == g


OLD_CERT = {"max_error": 0.2, "delta": 0.1, "threshold": 0.5, "coverage": 0.8, "bound": 0.19,
            "n": 500, "kept": 400, "kept_errors": 60}


def test_a_rate_certificate_written_before_batches_still_loads() -> None:
    g = CalibrationDocument.from_dict(_certified_doc(OLD_CERT)).method("answer").guarantees[0]
    assert (g.batch, g.batch_target, g.target) == (None, None, 0.2)
    assert "batch" not in g.model_dump(mode="json")


def test_a_batch_certificate_is_checked_against_its_batch_target() -> None:
    from calibserve.calibration.guarantee import batch_error_target

    beta = batch_error_target(0.2, 0.1, 50)  # 0.119
    ok = {**OLD_CERT, "bound": beta - 0.001, "batch": 50, "batch_target": beta}
    CalibrationDocument.from_dict(_certified_doc(ok))
    for bad, why in [({**ok, "bound": 0.19}, "above batch_target"),  # meets alpha, not beta
                     ({**ok, "batch_target": 0.15}, "not the batch target"),
                     ({**OLD_CERT, "batch": 50}, "come together"),
                     ({**ok, "batch": 0}, "batch")]:
        with pytest.raises(CalibrationError, match=why):
            CalibrationDocument.from_dict(_certified_doc(bad))
