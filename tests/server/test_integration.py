"""calibserve in front of real vLLM CPU servers, driven by the official openai SDK.

One vLLM server for the demo's aligned model (shared fixture, fronted with `--upstream`) and the
merged model (calibration.json, `answer` method). The managed engine calibserve starts itself
(killed once: 503, then recovery) is tested as users run it, in test_console_vllm.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

import calibserve.calibration as calibration
from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.server.config import ServerSettings
from calibserve.testing.checks import sample
from calibserve.testing.verify_ids import check_verify_ids
from tests.server.conftest import RunningServer, serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def mc_items(demo_dir: Path, n: int = 12) -> list[dict[str, Any]]:
    path = demo_dir / "data" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def mc_prompt(item: dict[str, Any]) -> str:
    from calibserve.demo.chat import format_mc_prompt

    return format_mc_prompt(item)


def as_dict(obj: Any) -> Any:
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


@pytest.fixture(scope="module")
def upstream(vllm_server: Callable[[Path, str], str], demo_dir: Path) -> str:
    return vllm_server(demo_dir / "aligned", "aligned")


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Iterator[RunningServer]:
    settings = ServerSettings.model_validate({
        "signing_key": "integration",
        "models": [{"name": "aligned", "upstreams": [upstream]}],
    })
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def via(proxy: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def direct(upstream: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{upstream}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def prompt(demo_dir: Path) -> str:
    return mc_prompt(mc_items(demo_dir, 1)[0])


def test_models_lists_the_route(via: openai.OpenAI) -> None:
    assert [m.id for m in via.models.list().data] == ["aligned"]


def test_chat_logprobs_confidence_and_headers(
    via: openai.OpenAI, direct: openai.OpenAI, prompt: str
) -> None:
    msgs = [{"role": "user", "content": prompt}]
    raw = via.chat.completions.with_raw_response.create(
        model="aligned", messages=msgs, temperature=0, max_tokens=4, logprobs=True,
        top_logprobs=5)
    resp = raw.parse()
    choice = resp.choices[0]
    conf = choice.model_extra["confidence"]
    lp = as_dict(choice.logprobs)
    # The confidence is calibration's Scorer on exactly the logprobs the client was given.
    expected = Scorer.from_config(None).score_choice(lp)
    assert conf == expected.to_dict()
    assert conf == {"score": expected.score, "raw": expected.raw, "method": "mean",
                    "calibrated": False}
    assert raw.headers["x-calibserve-confidence"] == f"{conf['score']:.6f}"
    assert raw.headers["x-calibserve-served-by"] == "aligned"
    assert raw.headers["x-calibserve-escalated"] == "false"
    assert resp.model_extra["calibserve"]["served_by"] == "aligned"
    assert resp.id.startswith("chatcmpl-") and resp.model == "aligned"
    assert resp.usage is not None and resp.usage.completion_tokens == len(lp["content"])
    # ... and those logprobs are what vLLM itself returns for the same request.
    ref = direct.chat.completions.create(
        model="aligned", messages=msgs, temperature=0, max_tokens=4, logprobs=True,
        top_logprobs=5).choices[0]
    assert choice.message.content == ref.message.content
    got = [(e["token"], e["logprob"]) for e in lp["content"]]
    want = [(e.token, e.logprob) for e in ref.logprobs.content]
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-4, atol=1e-5)

    # Fewer top_logprobs than the router asks for: cut to what the client asked.
    two = via.chat.completions.create(model="aligned", messages=msgs, temperature=0,
                                      max_tokens=4, logprobs=True, top_logprobs=2).choices[0]
    for entry, full in zip(two.logprobs.content, lp["content"], strict=True):
        assert [t.token for t in entry.top_logprobs] == [
            t["token"] for t in full["top_logprobs"][:2]]
    # No logprobs asked: none returned, confidence still there.
    off = via.chat.completions.create(model="aligned", messages=msgs, temperature=0, max_tokens=4)
    assert off.choices[0].logprobs is None
    assert off.choices[0].model_extra["confidence"]["score"] == pytest.approx(conf["score"],
                                                                             rel=1e-4)


def test_completions_logprobs_and_confidence(
    via: openai.OpenAI, direct: openai.OpenAI, prompt: str
) -> None:
    text = f"<|user|> {prompt} <|assistant|> answer :"
    resp = via.completions.create(model="aligned", prompt=text, temperature=0, max_tokens=3,
                                  logprobs=5)
    choice = resp.choices[0]
    lp = as_dict(choice.logprobs)
    expected = Scorer.from_config(None).score_choice(lp)
    assert choice.model_extra["confidence"]["score"] == expected.score
    assert resp.id.startswith("cmpl-")
    ref = direct.completions.create(model="aligned", prompt=text, temperature=0, max_tokens=3,
                                    logprobs=5).choices[0]
    assert choice.text == ref.text and lp["tokens"] == ref.logprobs.tokens
    one = via.completions.create(model="aligned", prompt=text, temperature=0, max_tokens=3,
                                 logprobs=1).choices[0]
    assert all(len(top) <= 2 for top in one.logprobs.top_logprobs)  # 1 best (+ sampled)
    off = via.completions.create(model="aligned", prompt=text, temperature=0, max_tokens=3)
    assert off.choices[0].logprobs is None


def test_n2_stop_and_max_tokens(via: openai.OpenAI, prompt: str) -> None:
    msgs = [{"role": "user", "content": prompt}]
    resp = via.chat.completions.create(model="aligned", messages=msgs, n=2, temperature=1.0,
                                       seed=1, max_tokens=3)
    assert len(resp.choices) == 2
    for c in resp.choices:
        assert 0 <= c.model_extra["confidence"]["score"] <= 1
    one = via.chat.completions.create(model="aligned", messages=msgs, temperature=0, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    full = via.chat.completions.create(model="aligned", messages=msgs, temperature=0,
                                       max_tokens=6).choices[0].message.content
    assert full
    first_word = full.split()[0]
    stopped = via.chat.completions.create(model="aligned", messages=msgs, temperature=0,
                                          max_tokens=6, stop=[first_word])
    assert first_word not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"


def collect_stream(stream: Any) -> tuple[list[Any], str]:
    chunks = list(stream)
    text = "".join(
        (c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
        for c in chunks if c.choices
    )
    return chunks, text


def test_chat_stream(via: openai.OpenAI, proxy: RunningServer, prompt: str) -> None:
    msgs = [{"role": "user", "content": prompt}]
    whole = via.chat.completions.create(model="aligned", messages=msgs, temperature=0,
                                        max_tokens=4)
    chunks, text = collect_stream(via.chat.completions.create(
        model="aligned", messages=msgs, temperature=0, max_tokens=4, stream=True,
        logprobs=True, top_logprobs=5, stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    conf = finish[0].choices[0].model_extra["confidence"]
    scorer = Scorer.from_config(None).stream()
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            scorer.feed(as_dict(c.choices[0].logprobs))
    assert conf["score"] == scorer.confidence().score
    last = chunks[-1]
    assert last.usage is not None and last.model_extra["calibserve"]["served_by"] == "aligned"
    r = httpx.post(f"{proxy.url}/v1/feedback", json={"id": last.id, "correct": True})
    assert r.status_code == 200 and r.json()["confidence"] == conf["score"]
    # Without logprobs asked: none in any chunk, the confidence is still on the finish chunk.
    chunks, _ = collect_stream(via.chat.completions.create(
        model="aligned", messages=msgs, temperature=0, max_tokens=4, stream=True))
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason][0].choices[
        0].model_extra["confidence"]["score"] == pytest.approx(conf["score"], rel=1e-4)


def test_completions_stream_n2(via: openai.OpenAI, prompt: str) -> None:
    text = f"<|user|> {prompt} <|assistant|> answer :"
    chunks = list(via.completions.create(model="aligned", prompt=text, max_tokens=3, n=2,
                                         temperature=1.0, seed=3, stream=True))
    finished = {c.choices[0].index: c.choices[0].model_extra["confidence"]
                for c in chunks if c.choices and c.choices[0].finish_reason}
    assert set(finished) == {0, 1}
    assert chunks[-1].id.startswith("cmpl-") and "calibserve" in chunks[-1].model_extra


def test_feedback_moves_bins_and_ece_to_calibrations_values(
    upstream: str, demo_dir: Path
) -> None:
    settings = ServerSettings.model_validate({
        "signing_key": "fb", "models": [{"name": "aligned", "upstreams": [upstream]}]})
    items = mc_items(demo_dir, 12)
    with serve(settings) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        pairs: list[tuple[float, bool]] = []
        for item in items:
            resp = client.chat.completions.create(
                model="aligned", messages=[{"role": "user", "content": mc_prompt(item)}],
                temperature=0, max_tokens=1)
            answer = (resp.choices[0].message.content or "").strip()
            correct = answer == "ABCDEFGH"[item["answer"]]
            score = resp.choices[0].model_extra["confidence"]["score"]
            r = httpx.post(f"{running.url}/v1/feedback", json={"id": resp.id, "correct": correct})
            assert r.status_code == 200, r.text
            pairs.append((score, correct))
        # A replay is refused and moves nothing.
        assert httpx.post(f"{running.url}/v1/feedback",
                          json={"id": resp.id, "correct": not correct}).status_code == 409
        text = httpx.get(f"{running.url}/metrics").text
    conf = np.array([p[0] for p in pairs])
    correct = np.array([p[1] for p in pairs])
    bins = calibration.bin_index(conf, n_bins=calibration.N_BINS)
    for b in range(15):
        sel = bins == b
        assert sample(text, "calibserve_calibration_samples_total", model="aligned",
                      bin=str(b)) == sel.sum()
        assert sample(text, "calibserve_calibration_correct_total", model="aligned",
                      bin=str(b)) == correct[sel].sum()
        assert sample(text, "calibserve_calibration_confidence_sum", model="aligned",
                      bin=str(b)) == pytest.approx(conf[sel].sum(), rel=1e-12, abs=1e-15)
    assert sample(text, "calibserve_ece", model="aligned") == pytest.approx(
        calibration.ece(conf, correct), rel=1e-12, abs=1e-15)


def test_errors_through_the_sdk(via: openai.OpenAI, upstream: str, prompt: str) -> None:
    msgs = [{"role": "user", "content": prompt}]
    with pytest.raises(openai.NotFoundError):
        via.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        via.chat.completions.create(model="aligned", messages=msgs, temperature=7)
    with pytest.raises(openai.BadRequestError) as info:  # vLLM's own 400 passes through
        via.chat.completions.create(model="aligned", messages=msgs, max_tokens=100_000)
    assert info.value.body is not None
    with pytest.raises(openai.APIStatusError) as big:
        via.chat.completions.create(model="aligned",
                                    messages=[{"role": "user", "content": "a " * 3_000_000}])
    assert big.value.status_code == 413
    settings = ServerSettings.model_validate({
        "signing_key": "k", "api_keys": ["sk-1"],
        "models": [{"name": "aligned", "upstreams": [upstream]}]})
    with serve(settings) as running:
        bad = openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="aligned", messages=msgs)
        good = openai.OpenAI(base_url=f"{running.url}/v1", api_key="sk-1", max_retries=0)
        assert good.chat.completions.create(model="aligned", messages=msgs, max_tokens=2).choices
    # Still serving after all of that.
    assert via.chat.completions.create(model="aligned", messages=msgs, max_tokens=2).choices


def test_merged_model_serves_answer_confidence(
    merged_dir: Path, vllm_server: Callable[[Path, str], str], demo_dir: Path
) -> None:
    model_dir = merged_dir / "model"  # merged_dir is the merge's OUT directory
    cal_path = model_dir / "calibration.json"
    assert cal_path.is_file(), "merge output must carry calibration.json"
    cal = CalibrationDocument.load(cal_path)
    url = vllm_server(model_dir, "merged")
    settings = ServerSettings.model_validate({
        "signing_key": "merged",
        "models": [{"name": "merged", "upstreams": [url], "upstream_model": "merged",
                    "calibration": str(cal_path)}],
    })
    scorer = Scorer.from_document(cal)
    with serve(settings) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        for item in mc_items(demo_dir, 3):
            resp = client.chat.completions.create(
                model="merged", messages=[{"role": "user", "content": mc_prompt(item)}],
                temperature=0, max_tokens=1, logprobs=True, top_logprobs=5)
            conf = resp.choices[0].model_extra["confidence"]
            expected = scorer.score_choice(as_dict(resp.choices[0].logprobs))
            assert conf["method"] == cal.multiple_choice == expected.method
            assert conf["score"] == expected.score and conf["raw"] == expected.raw
            assert conf["calibrated"] is expected.calibrated is True  # answer's own map


def test_merged_model_serves_verify_confidence_on_free_form_replies(
    merged_dir: Path, vllm_server: Callable[[Path, str], str], tmp_path: Path
) -> None:
    """A document with `free_form: "verify"`: a free-form reply gets its confidence from one
    extra max_tokens-1 request to the same engine, which the client never sees; option-letter
    replies keep `answer` and cost no extra request.

    "hello" lists no options, so its reply (a value, or a letter: the demo chat template ends
    `... answer :`) is free-form; the completions endpoint gives another (a raw prompt,
    continued as free text)."""
    model_dir = merged_dir / "model"
    data = json.loads((model_dir / "calibration.json").read_text())
    answer = {k: v for k, v in data["methods"]["answer"].items()
              if k in ("params", "calibrator", "thresholds")}  # not the fit: another writer's
    cal_path = CalibrationDocument.from_dict({
        "version": 2, "methods": {"answer": answer, "mean": {}, "verify": {}},
        "multiple_choice": "answer", "free_form": "verify"}).write(tmp_path / "calibration.json")
    url = vllm_server(model_dir, "merged")
    settings = ServerSettings.model_validate({
        "signing_key": "merged-verify",
        "models": [{"name": "merged", "upstreams": [url], "upstream_model": "merged",
                    "calibration": str(cal_path)}],
    })

    def verify_requests(running: RunningServer) -> float:
        text = httpx.get(f"{running.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("calibserve_confidence_requests_total{"))

    with serve(settings) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        chat = client.chat.completions.create(
            model="merged", messages=[{"role": "user", "content": "hello"}],
            temperature=0, max_tokens=12)
        chat_conf = chat.choices[0].model_extra["confidence"]
        # "hello" lists no options: whatever the first token, never the option-letter method.
        assert chat_conf["method"] in ("verify", "mean"), chat_conf
        # The demo's chat replies are values since the world teaches short answers: each such
        # reply sends one verify request too, so the completions below are counted from here.
        before = verify_requests(running)
        # min_tokens (vLLM's sampling parameter, passed through): a raw prompt's continuation
        # may start with the end-of-sequence token on a given build of the demo world, and an
        # empty reply has nothing to verify.
        resp = client.completions.create(
            model="merged", prompt="tell me about the sokiba", temperature=0, max_tokens=12,
            extra_body={"min_tokens": 2})
        (choice,) = resp.choices
        conf = choice.model_extra["confidence"]
        assert choice.logprobs is None and choice.text
        assert conf["method"] != "answer", conf  # a free-form continuation
        assert conf["calibrated"] is False  # neither verify nor mean has a map of its own here
        metrics = httpx.get(f"{running.url}/metrics").text
        # The verify request was sent (and answered) whatever the verdict. A tokenizer with
        # yes/no tokens gives a verdict (`verify`); the demo's vocabulary (335 tokens) has none
        # today, so no verdict is possible and the reply is served, labelled, as `mean`.
        if _has_yes_no(model_dir):
            assert conf["method"] == "verify", conf
            outcome = "ok"
        else:
            assert conf["method"] == "mean", conf
            outcome = "no_verdict"
        assert verify_requests(running) == before + 1.0, metrics
        assert sample(metrics, "calibserve_confidence_requests_total", route="merged",
                      method="verify", outcome=outcome) >= 1.0, metrics
        assert 0.0 <= conf["score"] == conf["raw"] <= 1.0
        streamed = client.completions.create(
            model="merged", prompt="tell me about the sokiba", temperature=0, max_tokens=12,
            extra_body={"min_tokens": 2}, stream=True)
        chunks = [c for c in streamed if c.choices]
        finals = [c.choices[0].model_extra.get("confidence") for c in chunks
                  if c.choices[0].finish_reason]
        assert finals == [conf]
        assert all(c.choices[0].model_extra.get("token_ids") is None and
                   c.choices[0].model_extra.get("prompt_token_ids") is None for c in chunks)
        assert verify_requests(running) == before + 2.0
        # The client never sees the token ids calibserve asked for (verify's prompt on ids),
        # and gets them when it asks.
        raw = httpx.post(f"{running.url}/v1/chat/completions", timeout=60, json={
            "model": "merged", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "temperature": 0}).json()
        assert raw["prompt_token_ids"] is None and raw["choices"][0]["token_ids"] is None
        raw = httpx.post(f"{running.url}/v1/completions", timeout=60, json={
            "model": "merged", "prompt": "tell me about the sokiba", "max_tokens": 4,
            "temperature": 0, "return_token_ids": True}).json()
        assert raw["choices"][0]["prompt_token_ids"] and raw["choices"][0]["token_ids"]


@pytest.mark.anyio
async def test_verify_prompt_on_ids_is_the_text_prompts_tokens(
    merged_dir: Path, vllm_server: Callable[[Path, str], str]
) -> None:
    """On the real engine and the demo's own chat template: the reply's prompt ids + its ids +
    the tail `VerifyTails` learns are exactly the tokens vLLM makes of verify's text prompt, for
    chat and completions, so the ids path asks the model the same question."""
    url = vllm_server(merged_dir / "model", "merged")
    await check_verify_ids(url, "merged", "what is the color of the sokiba ?", "the sokiba is")


def _has_yes_no(model_dir: Path) -> bool:
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    words = {calibration.normalize_token(t).lower() for t in vocab}
    return bool(words & {"yes", "true"}) and bool(words & {"no", "false"})
