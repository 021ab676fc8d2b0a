"""The demo server's free-form confidence end to end: a real vLLM CPU engine on the merged demo
model, the free-form calibrators `calibserve demo` fits through the serving path, calibserve on a
real socket, and the official openai SDK sending one plain short-answer question."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from calibserve.calibration import CalibrationDocument, ServedMethod
from calibserve.demo_pipeline import served_demo_model
from calibserve.server.config import ModelSettings, ServerSettings
from calibserve.testing.servers import InProcessServer


@pytest.mark.demo
@pytest.mark.vllm
def test_a_short_answer_gets_a_calibrated_free_form_confidence(
    demo_dir: Path, merged_dir: Path, vllm_server: Callable[[Path, str], str]
) -> None:
    openai = pytest.importorskip("openai")
    # The engine other tests share ("merged"): the served model is the merge's weights.
    url = vllm_server(merged_dir / "model", "merged")
    served = served_demo_model(demo_dir, merged_dir, upstream=url, upstream_model="merged")
    doc = CalibrationDocument.load(served)
    model = ModelSettings(name="calibserve-demo", upstreams=[url], upstream_model="merged",
                          calibration=served / "calibration.json")
    question = json.loads((demo_dir / "data" / "short_test.jsonl").open().readline())["question"]
    with InProcessServer(ServerSettings(models=[model], signing_key="test")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="calibserve-demo", messages=[{"role": "user", "content": question}],
            max_tokens=16, temperature=0.0,
        )
    choice = reply.choices[0]
    conf = choice.confidence  # calibserve's extension field, kept by the SDK
    text = choice.message.content or ""
    assert text.strip() and text.split()[0] not in {"A", "B", "C", "D"}  # a value, not a letter
    assert conf["method"] == doc.free_form and conf["method"] != doc.multiple_choice
    entry = doc.method(conf["method"])
    assert conf["calibrated"] is True and entry.calibrated and entry.fit is not None
    # The score is the method's own map of its raw, not the option-letter map.
    assert conf["score"] == pytest.approx(ServedMethod.from_document(doc, conf["method"])
                                          .score(float(conf["raw"])), abs=1e-9)
