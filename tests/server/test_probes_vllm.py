"""Probes on a real vLLM engine serving the merged demo model: the held-out split merge wrote,
scored exactly as a client's request through the public API is (official openai SDK)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from calibserve.calibration import CalibrationAccumulator, normalize_token
from calibserve.server.config import ServerSettings
from calibserve.server.probes import LETTERS, format_mc_prompt
from calibserve.testing.checks import total
from tests.server.conftest import serve

N = 40  # probes compared one by one (about 2 s on the CPU engine)


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.vllm
def test_probes_are_held_out_and_scored_as_clients_are(
    merged_dir: Path, demo_dir: Path, vllm_server: Callable[[Path, str], str]
) -> None:
    model_dir = merged_dir / "model"
    probes = read_jsonl(model_dir / "probes.jsonl")
    # The merge's default probe split is its held-out test split, never the fitted items.
    assert probes == read_jsonl(demo_dir / "data" / "test.jsonl")
    fitted = {json.dumps(it, sort_keys=True) for it in read_jsonl(demo_dir / "data" /
                                                                  "calibrate.jsonl")}
    assert not any(json.dumps(it, sort_keys=True) in fitted for it in probes)

    url = vllm_server(model_dir, "merged")
    settings = ServerSettings.model_validate({
        "signing_key": "probes", "probe_rate": 1,
        "models": [{"name": "merged", "upstreams": [url], "upstream_model": "merged",
                    "calibration": str(model_dir / "calibration.json")}],
    })
    with serve(settings) as running:
        rt = running.runtime
        [runner] = rt.probes
        assert runner.probes.path == model_dir / "probes.jsonl"  # found beside calibration.json
        running.call(runner.stop())  # the rest is driven one probe at a time
        before = rt.metrics.accumulator("merged", "answer", "probe")
        for probe in runner.probes.probes[:N]:
            running.call(runner.ask(probe))
        after = rt.metrics.accumulator("merged", "answer", "probe")
        metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
        assert total(metrics, "calibserve_requests_total") == 0  # probes are not user traffic
        assert total(metrics, "calibserve_confidence_count") == 0

        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        expected = CalibrationAccumulator()
        for item in probes[:N]:
            resp = client.chat.completions.create(
                model="merged", messages=[{"role": "user", "content": format_mc_prompt(item)}],
                temperature=0, max_tokens=1)
            conf = resp.choices[0].model_extra["confidence"]
            assert conf["method"] == "answer" and conf["calibrated"] is True
            reply = resp.choices[0].message.content or ""
            right = normalize_token(reply) == LETTERS[int(item["answer"])]  # type: ignore[call-overload]
            expected.update(conf["score"], right)

    np.testing.assert_array_equal(after.counts - before.counts, expected.counts)
    np.testing.assert_allclose(after.conf_sum - before.conf_sum, expected.conf_sum, atol=1e-9)
    np.testing.assert_array_equal(after.correct_sum - before.correct_sum, expected.correct_sum)
    assert expected.count == N and 0 < float(expected.correct_sum.sum()) < N
