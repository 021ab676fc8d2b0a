"""verify and consistency fitted through the serving path on a real BPE model (SmolLM2-135M):
its tokenizer has yes/no tokens, its chat replies are free-form, so both methods serve replies
through calibserve's app over a real vLLM CPU engine, get their own calibrators, and a second
serving with the fitted document serves exactly the fitted map."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibserve.calibration import CalibrationDocument, ServedMethod
from calibserve.serve_fit import (
    ask_short_answers,
    checkpoint_verdict_tokens,
    serve_and_fit,
    with_free_form,
)

# Short questions a 135M instruct model gets partly right (the fit needs both classes).
QUESTIONS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"), ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"), ("What is 2 + 2?", "4"),
    ("What colour is the sky on a clear day?", "blue"), ("What is the opposite of hot?", "cold"),
    ("What is the capital of Australia?", "Canberra"), ("How many legs does a spider have?", "8"),
    ("What is the chemical symbol for gold?", "Au"), ("What is 7 times 8?", "56"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the capital of Canada?", "Ottawa"), ("How many days are in a week?", "7"),
    ("What is the capital of Egypt?", "Cairo"),
]
PROMPT = "{} Answer with one word."


def _items(rows: list[tuple[str, str]]) -> list[dict[str, object]]:
    return [{"question": PROMPT.format(q), "answer": a, "aliases": [f"{a}."]} for q, a in rows]


@pytest.mark.vllm
def test_verify_and_consistency_fit_through_the_serving_path(
    smollm2_dir: Path, smollm2_url: str, tmp_path: Path
) -> None:
    assert checkpoint_verdict_tokens(smollm2_dir).usable
    doc = CalibrationDocument.from_dict({"version": 2, "methods": {
        "answer": {"params": {"options": ["A", "B", "C", "D"], "temperature": 1.0}},
        "mean": {}}, "multiple_choice": "answer", "free_form": "mean"})
    cal, test = _items(QUESTIONS[:12]), _items(QUESTIONS[12:])
    fit = serve_and_fit(smollm2_dir, doc, cal, test,
                        methods=("mean", "verify", "consistency"), upstream=smollm2_url,
                        upstream_model="smollm2", max_tokens=6, consistency_k=3,
                        kind="platt")
    rows = fit.report["calibrate"]["methods"]
    for method in ("verify", "consistency"):
        entry = fit.methods[method]
        assert entry.fit is not None and entry.fit.n == rows[method]["n"] > 0
        assert entry.fit.n + sum(rows[method].get("not_served", {}).values()) == len(cal)
    assert fit.methods["consistency"].params.k == 3
    out = with_free_form(doc, fit).write(tmp_path / "calibration.json")
    fitted = CalibrationDocument.load(out)
    # Serve verify with its fitted map: what a client gets is that map of the served raw.
    data = fitted.to_dict()
    data["free_form"] = "verify"
    served_doc = CalibrationDocument.from_dict(data).write(tmp_path / "verify.json")
    replies = ask_short_answers([str(it["question"]) for it in cal[:4]], upstream=smollm2_url,
                                upstream_model="smollm2", calibration=served_doc,
                                max_tokens=6)
    served = ServedMethod.from_document(fitted, "verify")
    verified = [r for r in replies if r.confidence["method"] == "verify"]
    assert verified, [r.confidence for r in replies]
    for r in verified:
        raw = float(r.confidence["raw"])
        assert 0.0 <= raw <= 1.0
        assert r.confidence["calibrated"] is served.calibrated
        assert r.confidence["score"] == pytest.approx(served.score(raw), abs=1e-9)
