"""Calibration probes: labelled questions calibserve asks its own engine, to measure live ECE.

User feedback is rare and late; probes are neither. A `ProbeSet` is eval JSONL (the contract's
multiple-choice `{"question", "choices", "answer": int}` or short-answer `{"question", "answer",
"aliases"?}` items): by default `probes.jsonl` next to the model's calibration.json, which merge
and `calibserve calibrate` write from the held-out test split (never the items the calibrator was
fitted on), or any file given with `--probe-data`.

A `ProbeRunner` sends one probe every `60 / rate` seconds per model through the serving path of
the model's primary tier: the same request shaping (`routing.client_view.tier_body`), the same
upstream client (transport, retries, breaker) and the same `Scorer` a client's request gets, asked
exactly as merge's evaluator asks (one user message, `format_mc_prompt`, greedy). It grades the
reply itself and records (served calibrated confidence, correct) in the per-bin counters labelled
`source="probe"`. On a route of three or more tiers whose middle tiers are judged (a policy of
their own, `--threshold guaranteed`), a probe the primary's policy would escalate goes on to the
next judged tier, as a client's request would, and is recorded under that tier's calibration
label (`model:tier`), so a middle tier's live window sees the traffic its certificate is about
(the items the earlier tiers did not keep); the last tier, which nothing judges, is never asked.
Probes never pass the router: no request, latency, confidence or escalation series counts them.
A probe that fails (upstream down, killed mid-answer, an answer without choices) is counted in
`calibserve_probes_total{outcome="error"}` under the tier's label and records nothing: a probe is
never graded on an answer it did not get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from calibserve.calibration.answers import exact_match, option_letter
from calibserve.calibration.document import PROBES_FILE
from calibserve.calibration.mc_prompt import LETTERS, format_mc_prompt
from calibserve.routing.client_view import tier_body
from calibserve.routing.payload import endpoint_path, options_offered, tier_top_logprobs
from calibserve.server.metrics import PROBE, ServerMetrics

log = logging.getLogger("calibserve.server.probes")

FILE_NAME = PROBES_FILE
MC_MAX_TOKENS = 1  # the option letter is the first token, as merge's evaluator reads it
SHORT_MAX_TOKENS = 16  # as `calibserve calibrate` asks short answers
MAX_IN_FLIGHT = 4  # a slow engine makes probes wait, never pile up


class ProbeDataError(ValueError):
    """A probe file that cannot be used (names the file and line)."""


@dataclass(frozen=True)
class Probe:
    """One labelled question: what is asked, and how the reply is graded."""

    content: str
    gold: str  # the right option letter, or the short answer
    aliases: tuple[str, ...] = ()
    multiple_choice: bool = True

    @property
    def max_tokens(self) -> int:
        return MC_MAX_TOKENS if self.multiple_choice else SHORT_MAX_TOKENS

    def grade(self, reply: str) -> bool:
        """Is `reply` right? Option items: its leading letter is the gold one
        (`answers.option_letter`)."""
        if self.multiple_choice:
            return option_letter(reply) == self.gold
        return exact_match(reply, self.gold, self.aliases)

    def body(self) -> dict[str, Any]:
        """The chat request of this probe (the model and logprobs are set per tier)."""
        return {"messages": [{"role": "user", "content": self.content}],
                "max_tokens": self.max_tokens, "temperature": 0.0}


def _probe(item: Any, where: str) -> Probe:
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise ProbeDataError(f"{where}: an item needs a string 'question'")
    if "choices" in item:
        choices, ans = item["choices"], item.get("answer")
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise ProbeDataError(f"{where}: 'choices' must be 2 to {len(LETTERS)} strings")
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise ProbeDataError(f"{where}: 'answer' must be the index of the right choice")
        if "prompt" in item and not isinstance(item["prompt"], str):
            raise ProbeDataError(f"{where}: 'prompt' must be a string (the user message)")
        return Probe(format_mc_prompt(item), LETTERS[ans])
    aliases = item.get("aliases", [])
    if not isinstance(item.get("answer"), str) or not (
            isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise ProbeDataError(f"{where}: a short-answer item needs a string 'answer' "
                             "(and 'aliases' a list of strings)")
    return Probe(item["question"], item["answer"], tuple(aliases), multiple_choice=False)


@dataclass(frozen=True)
class ProbeSet:
    """The probes of one model, read from one JSONL file."""

    path: Path
    probes: tuple[Probe, ...]

    @classmethod
    def load(cls, path: Path) -> ProbeSet:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProbeDataError(f"{path}: cannot read ({exc})") from None
        probes = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProbeDataError(f"{where}: not JSON ({exc.msg})") from None
            probes.append(_probe(item, where))
        if not probes:
            raise ProbeDataError(f"{path}: no probe items")
        return cls(path, tuple(probes))


def write_probe_split(items: Sequence[Mapping[str, Any]], directory: Path) -> Path:
    """`directory/probes.jsonl` holding `items` (the held-out split), written atomically."""
    from calibserve.publish import write_atomic

    out = Path(directory) / FILE_NAME
    write_atomic(out, "".join(json.dumps(dict(it)) + "\n" for it in items))
    return out


class ProbeMetrics:
    """`calibserve_probes_total{model, outcome}`: ok (graded and recorded) | error | skipped
    (the previous probes were still in flight)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter("calibserve_probes", "Calibration probes sent, by outcome",
                              ["model", "outcome"], registry=registry)


@dataclass(frozen=True)
class OnwardTier:
    """A judged middle tier a probe goes on to when the tier before it would escalate."""

    label: str  # its calibration label, `model:tier`
    tier: Any  # routing.Tier
    methods: tuple[str, ...]  # the methods it serves (its per-bin counters)


class ProbeRunner:
    """Sends one model's probes at `rate` per minute; `start()` / `await stop()`.

    `policy_for(i)` (the route's `Route.policy_for`, read at each probe, so a re-certified
    threshold is followed) judges the answer of tier i (the primary, then each of `onward`): a
    probe whose answer it would escalate is asked of `onward[i]` too."""

    def __init__(self, model: str, tier: Any, probes: ProbeSet, rate: float,
                 metrics: ServerMetrics, probe_metrics: ProbeMetrics, methods: tuple[str, ...],
                 seed: int = 0, clock: Callable[[], float] = time.monotonic,
                 onward: Sequence[OnwardTier] = (),
                 policy_for: Callable[[int], Any] | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"probe rate must be positive, got {rate!r}")
        if onward and policy_for is None:
            raise ValueError("a probe that goes on to other tiers needs their policies")
        self.model = model
        self.tier = tier  # routing.Tier: model, upstream, scorer
        self.onward = tuple(onward)
        self.policy_for = policy_for
        self.probes = probes
        self.interval = 60.0 / rate
        self.metrics = metrics
        self.counter = probe_metrics.probes
        self._order = list(range(len(probes.probes)))
        random.Random(seed).shuffle(self._order)
        self._next = 0
        self._clock = clock
        # Called with (method, raw, correct) of each recorded probe of the primary (online
        # recalibration, its live guarantee).
        self.on_outcome: Callable[[str, float, bool], None] | None = None
        # Called with (label, method, raw, correct) of each recorded probe of an onward tier.
        self.on_onward_outcome: Callable[[str, str, float, bool], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        for label, label_methods in [(model, methods),
                                     *((t.label, t.methods) for t in self.onward)]:
            for outcome in ("ok", "error", "skipped"):
                self.counter.labels(label, outcome)
            metrics.init_source(label, label_methods, PROBE)

    def next_probe(self) -> Probe:
        probe = self.probes.probes[self._order[self._next % len(self._order)]]
        self._next += 1
        return probe

    async def ask(self, probe: Probe) -> None:
        """One probe through the primary tier's serving path, graded and recorded, then on to
        each judged middle tier while the tier before would escalate it; never raises (a
        failure is counted under the tier's label, records nothing and ends the walk)."""
        tiers = [(self.model, self.tier), *((t.label, t.tier) for t in self.onward)]
        for index, (label, tier) in enumerate(tiers):
            conf = await self._ask_tier(probe, label, tier)
            if conf is None:
                return
            score, method, raw, right, calibrated = conf
            self.metrics.record_outcome(label, score, right, method, PROBE)
            self.counter.labels(label, "ok").inc()
            if index == 0 and self.on_outcome is not None:
                self.on_outcome(method, raw, right)
            elif index > 0 and self.on_onward_outcome is not None:
                self.on_onward_outcome(label, method, raw, right)
            if index >= len(self.onward):
                return
            assert self.policy_for is not None  # checked in __init__
            policy = self.policy_for(index)
            if policy is None or not policy.decide(score, method, calibrated).escalate:
                return

    async def _ask_tier(self, probe: Probe, label: str, tier: Any
                        ) -> tuple[float, str, float, bool, bool] | None:
        """(served score, method, raw, right, calibrated) of `tier`'s answer to `probe`, asked
        as a client's request would be; None when it failed (counted under `label`)."""
        try:
            asked = probe.body()
            scorer = tier.confidence_scorer
            offered = options_offered("chat", asked, scorer)  # as for a client's request
            body = tier_body("chat", asked, tier.model, stream=False,
                             top_logprobs=tier_top_logprobs(scorer, offered))
            answer = await tier.upstream.request_json(endpoint_path("chat"), body)
            choice = answer["choices"][0]
            reply = (choice.get("message") or {}).get("content")
            if not isinstance(reply, str):
                raise ValueError("the answer has no message content")
            conf = scorer.score_choice(choice.get("logprobs"), offered)
            score = float(conf.score)
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"confidence {score!r} out of range")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a probe must never take the server down
            log.debug("probe for %s failed: %s", label, exc)
            self.counter.labels(label, "error").inc()
            return None
        return (score, str(conf.method), float(conf.raw), probe.grade(reply),
                bool(getattr(conf, "calibrated", False)))

    def tick(self) -> None:
        """Launch the next probe unless too many are still in flight."""
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self.counter.labels(self.model, "skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(self.ask(self.next_probe()))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _run(self) -> None:
        due = self._clock()
        while True:
            self.tick()
            due += self.interval
            await asyncio.sleep(max(0.0, due - self._clock()))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._in_flight) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
