"""Asking calibserve one multiple-choice item at a time: through the server's HTTP app, or
(fallback) straight through routing.Router. Both return the same `Answer` records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from calibserve.routing import NeverPolicy, Route, Router, ThresholdPolicy, Tier, Upstream
from calibserve.routing.agreement import named_letter

LETTERS = "ABCDEFGH"


def mc_prompt(item: dict[str, Any]) -> str:
    # docs/internals.md: `question : {question} A {c0} B {c1} ...`
    parts = [f"question : {item['question']}"]
    parts += [f"{LETTERS[i]} {c}" for i, c in enumerate(item["choices"])]
    return " ".join(parts)


def chat_body(model: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": mc_prompt(item)}]}


@dataclass
class Answer:
    letter: str | None
    correct: bool
    score: float
    raw: float
    served_by: str
    escalated: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_from(body: dict[str, Any], item: dict[str, Any], meta: dict[str, Any]) -> Answer:
    choice = body["choices"][0]
    content = (choice.get("message") or {}).get("content") or ""
    letter = named_letter(content)
    conf = choice["confidence"]
    return Answer(letter, letter == LETTERS[item["answer"]], float(conf["score"]),
                  float(conf["raw"]), str(meta.get("served_by")), bool(meta.get("escalated")))


@dataclass(frozen=True)
class TierSpec:
    name: str
    url: str
    calibration: Path | None


class ServerAsker:
    """The real server app (`calibserve.server.app.create_app`) driven in-process over ASGI."""

    via = "server HTTP app (calibserve.server.app.create_app over httpx.ASGITransport)"

    def __init__(self, primary: TierSpec, expert: TierSpec | None = None,
                 threshold: float | None = None) -> None:
        from calibserve.server.config import ModelSettings, ServerSettings, TierSettings

        escalate = []
        if expert is not None:
            escalate = [TierSettings(name=expert.name, upstreams=[expert.url],
                                     upstream_model=expert.name, calibration=expert.calibration)]
        model = ModelSettings(
            name="route", upstreams=[primary.url], upstream_model=primary.name,
            calibration=primary.calibration, escalate_to=escalate,
            policy="threshold" if expert is not None else "never", threshold=threshold,
        )
        self.settings = ServerSettings(models=[model], signing_key="escalation-benchmark")

    async def __aenter__(self) -> ServerAsker:
        from calibserve.server.app import create_app
        from calibserve.server.runtime import ServerRuntime

        self.runtime = ServerRuntime(self.settings)
        await self.runtime.start()
        app = create_app(self.settings, self.runtime)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://calibserve", timeout=120)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.runtime.stop()

    async def ask(self, item: dict[str, Any]) -> Answer:
        r = await self.client.post("/v1/chat/completions", json=chat_body("route", item))
        r.raise_for_status()
        body = r.json()
        return answer_from(body, item, body["calibserve"])


class RouterAsker:
    """routing.Router directly (used when the server app cannot be imported)."""

    via = "routing.Router directly (server app unavailable)"

    def __init__(self, primary: TierSpec, expert: TierSpec | None = None,
                 threshold: float | None = None) -> None:
        from calibserve.calibration import Scorer

        def tier(spec: TierSpec) -> Tier:
            cal = json.loads(spec.calibration.read_text()) if spec.calibration else None
            return Tier(spec.name, Upstream(spec.name, spec.url, timeout=120),
                        Scorer.from_config(cal))

        tiers = [tier(primary)] + ([tier(expert)] if expert else [])
        policy = ThresholdPolicy(threshold) if expert and threshold is not None else NeverPolicy()
        self.route = Route("route", tiers, policy)
        self.router = Router([self.route])

    async def __aenter__(self) -> RouterAsker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.router.aclose()

    async def ask(self, item: dict[str, Any]) -> Answer:
        res = await self.router.complete(self.route, "chat", chat_body("route", item))
        assert res.body is not None
        return answer_from(res.body, item, res.calibserve())


def asker_class(prefer_server: bool = True) -> type[ServerAsker] | type[RouterAsker]:
    if prefer_server:
        try:
            import calibserve.server.app  # noqa: F401
            import calibserve.server.runtime  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure means: use the router
            return RouterAsker
        return ServerAsker
    return RouterAsker


async def ask_all(asker: ServerAsker | RouterAsker, items: Sequence[dict[str, Any]],
                  concurrency: int = 4) -> list[Answer]:
    gate = asyncio.Semaphore(concurrency)

    async def one(item: dict[str, Any]) -> Answer:
        async with gate:
            return await asker.ask(item)

    return list(await asyncio.gather(*(one(i) for i in items)))
