"""A label-free map (`fit.labels: "none"`, calibserve calibrate --label-free) is served with
`confidence.calibration: "label-free"`, batch and streamed; a labelled one keeps the four fields.

The fake upstream answers "A t1 t2 ..." with logprobs; the prompt offers options A-D, so the
reply is scored by `answer` through the document's option temperature.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from calibserve.calibration import CalibrationDocument
from calibserve.server.config import ServerSettings
from tests.server.conftest import FakeUpstream, serve

REQUEST = {"model": "m", "logprobs": True, "top_logprobs": 3,
           "messages": [{"role": "user", "content": "question : ? A x B y C z D w"}]}


def _document(path: Path, labels: str) -> Path:
    fit: dict[str, object] = {"n": 50, "ece_raw": 0.2, "ece_calibrated": 0.05, "labels": labels}
    if labels == "none":
        fit.update(agreement=0.8, n_agree=40, reference="base")
    CalibrationDocument.from_dict({
        "version": 2,
        "methods": {"answer": {"params": {"options": list("ABCD"), "temperature": 3.0},
                               "calibrator": {"type": "identity"}, "fit": fit},
                    "mean": {}},
        "multiple_choice": "answer", "free_form": "mean",
    }).write(path)
    return path


def test_the_confidence_block_says_a_map_was_fitted_without_labels(
        fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.mode("ok")
    seen: dict[str, list[dict[str, object]]] = {}
    for labels in ("none", "gold"):
        settings = ServerSettings.model_validate({
            "signing_key": "k", "models": [{
                "name": "m", "upstreams": [fake_upstream.url], "upstream_model": "fake-model",
                "calibration": str(_document(tmp_path / f"{labels}.json", labels))}]})
        with serve(settings) as running:
            r = httpx.post(f"{running.url}/v1/chat/completions", json=REQUEST, timeout=10)
            assert r.status_code == 200, r.text
            with httpx.stream("POST", f"{running.url}/v1/chat/completions",
                              json={**REQUEST, "stream": True}, timeout=10) as s:
                events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        streamed = [c["confidence"] for e in events[:-1] for c in json.loads(e).get("choices", [])
                    if "confidence" in c]
        assert streamed
        seen[labels] = [r.json()["choices"][0]["confidence"], *streamed]
    for conf in seen["none"]:
        assert conf["method"] == "answer" and conf["calibrated"] is True
        assert conf["calibration"] == "label-free"
    for conf in seen["gold"]:
        assert conf["calibrated"] is True
        assert set(conf) == {"score", "raw", "method", "calibrated"}
