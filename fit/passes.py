"""The serving-path pass: questions sent through calibserve's own app, replies as served.

A real vLLM engine on the checkpoint (calibserve's managed engine, or `upstream=` an engine
already running) behind calibserve's app in this process (`server.app.create_app` over
`httpx.ASGITransport`), each question one plain user chat message (logprobs, top 5). One pass per
calibration document, one engine for all of them; each pass also says how the server's extra
requests (verify, consistency: routing/confidence_work.py) ended, from its own counter.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from calibserve.fit.errors import ServeFitError

__all__ = [
    "EXTRA_OUTCOMES",
    "SERVED_NAME",
    "Reply",
    "ServedPass",
    "Split",
    "ask_short_answers",
    "extra_request_notes",
    "serve_passes",
]

# The name the passes serve the checkpoint under (the `route` label of the server's counters).
SERVED_NAME = "calibserve-fit"


@dataclass(frozen=True)
class Reply:
    """One short-answer question as served: the reply text, `confidence`, `logprobs`."""

    text: str
    confidence: Mapping[str, Any]
    logprobs: Any


# One split as served: its items and their replies, in the same order.
Split = tuple[Sequence[Mapping[str, Any]], Sequence[Reply]]


def _settings(model_dir: Path | None, upstream: str | None, upstream_model: str | None,
              calibration: Path | None) -> Any:
    from calibserve.server.config import ModelSettings, ServerSettings

    source: dict[str, Any] = (
        {"upstreams": [upstream], "upstream_model": upstream_model}
        if upstream is not None else {"model": model_dir}
    )
    model = ModelSettings(name=SERVED_NAME, calibration=calibration, **source)
    return ServerSettings(models=[model], signing_key=secrets.token_hex(16), log_level="warning")


# `calibserve_confidence_requests_total` outcomes (routing/confidence_work.py).
EXTRA_OUTCOMES = ("ok", "no_verdict", "error", "unsupported")


@dataclass(frozen=True)
class ServedPass:
    """One pass of the questions through the serving path: the replies, and how the server's
    extra requests ended (`{method: {outcome: count}}`, from its own counter)."""

    replies: list[Reply]
    extra_requests: dict[str, dict[str, int]]


def _extra_requests(runtime: Any) -> dict[str, dict[str, int]]:
    registry = runtime.routing_metrics.registry
    out: dict[str, dict[str, int]] = {}
    for method in ("verify", "consistency"):
        counts = {o: int(registry.get_sample_value(
            "calibserve_confidence_requests_total",
            {"route": SERVED_NAME, "method": method, "outcome": o}) or 0)
            for o in EXTRA_OUTCOMES}
        if any(counts.values()):
            out[method] = counts
    return out


async def _ask(
    settings: Any, questions: Sequence[str], max_tokens: int, temperature: float,
    concurrency: int, then: Sequence[Path] = (), mc_questions: Sequence[str] = (),
) -> list[ServedPass]:
    """The questions served with `settings` (and `mc_questions` after them), then the questions
    again with each document of `then` (a calibserve app over the same engine: the managed one
    when `settings` has one)."""
    from calibserve.server.app import create_app
    from calibserve.server.runtime import ServerRuntime

    async def served(settings: Any, runtime: Any, asked: Sequence[str]) -> ServedPass:
        app = create_app(settings, runtime)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://calibserve",
                                     timeout=600) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(question: str) -> Reply:
                body = {"model": SERVED_NAME, "max_tokens": max_tokens,
                        "temperature": temperature, "logprobs": True, "top_logprobs": 5,
                        "messages": [{"role": "user", "content": question}]}
                async with gate:
                    r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    raise ServeFitError(f"the serving path answered {r.status_code}: {r.text}")
                choice = r.json()["choices"][0]
                text = (choice.get("message") or {}).get("content") or ""
                return Reply(text, choice["confidence"], choice.get("logprobs"))

            replies = list(await asyncio.gather(*(one(q) for q in asked)))
            return ServedPass(replies, _extra_requests(runtime))

    runtime = ServerRuntime(settings)
    await runtime.start()
    try:
        out = [await served(settings, runtime, [*questions, *mc_questions])]
        model = settings.models[0]
        engine = runtime.models[model.name].primary.engine
        upstream = engine.url if engine is not None else model.upstreams[0]
        upstream_model = SERVED_NAME if engine is not None else model.upstream_model
        for calibration in then:
            again = _settings(None, upstream, upstream_model, calibration)
            other = ServerRuntime(again)
            await other.start()
            try:
                out.append(await served(again, other, questions))
            finally:
                await other.stop()
        return out
    finally:
        await runtime.stop()


def ask_short_answers(
    questions: Sequence[str],
    *,
    model_dir: Path | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    calibration: Path | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    concurrency: int = 8,
) -> list[Reply]:
    """Each question as a plain user message through calibserve's app: a managed vLLM engine on
    `model_dir`, or the vLLM at `upstream`; served with `calibration` (a calibration.json)."""
    return serve_passes(questions, [calibration], model_dir=model_dir, upstream=upstream,
                        upstream_model=upstream_model, max_tokens=max_tokens,
                        temperature=temperature, concurrency=concurrency)[0].replies


def serve_passes(
    questions: Sequence[str],
    calibrations: Sequence[Path | None],
    *,
    model_dir: Path | None = None,
    upstream: str | None = None,
    upstream_model: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    concurrency: int = 8,
    mc_questions: Sequence[str] = (),
) -> list[ServedPass]:
    """`ask_short_answers` once per calibration document, one engine for all of them (a managed
    engine on `model_dir` is started once), with how each pass's extra requests (verify,
    consistency) ended. `mc_questions` (multiple-choice prompts) are asked in the first pass
    only, after `questions` (their replies follow theirs)."""
    if (model_dir is None) == (upstream is None):
        raise ValueError("give exactly one of model_dir or upstream")
    if not calibrations:
        return []
    first, *then = calibrations
    if any(c is None for c in then):
        raise ValueError("only the first pass may be served without a calibration document")
    settings = _settings(model_dir, upstream, upstream_model, first)
    return asyncio.run(_ask(settings, questions, max_tokens, temperature, concurrency,
                            [c for c in then if c is not None], mc_questions))


def extra_request_notes(extra: Mapping[str, Mapping[str, int]]) -> list[str]:
    """What to say about extra requests that did not give their method's confidence (those
    replies were served by the `mean` fallback and are not in that method's fit)."""
    notes: list[str] = []
    for method, counts in extra.items():
        total = sum(counts.values())
        failed = {o: n for o, n in counts.items() if o != "ok" and n}
        if failed:
            parts = ", ".join(f"{n} {o}" for o, n in failed.items())
            notes.append(f"{method}: {total - counts.get('ok', 0)} of {total} extra requests "
                         f"gave no confidence ({parts}); those replies were served by mean")
    return notes
