"""The server's runtime: routes, upstreams, managed engines, signer, feedback and metrics.

Built from `ServerSettings` alone (no CLI), held on `app.state.runtime`, started and stopped by the
app's lifespan. The reliability harness and deploy tests build one directly::

    runtime = ServerRuntime(settings); await runtime.start(); ...; await runtime.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.routing import (
    BudgetPolicy,
    CircuitBreaker,
    NeverPolicy,
    Policy,
    ReplicaPool,
    RetryPolicy,
    Route,
    Router,
    RoutingMetrics,
    ThresholdPolicy,
    Tier,
    Upstream,
    UpstreamClient,
    choose_model,
    probe_health,
    served_models,
)
from calibserve.routing.payload import serves_verify
from calibserve.routing.transport import LeanTransport
from calibserve.server.config import ModelSettings, ServerSettings, TierSettings
from calibserve.server.drift import FitReference
from calibserve.server.engine import ManagedEngine
from calibserve.server.feedback import FeedbackRecorder
from calibserve.server.guarantee import GuaranteeMetrics, LiveGuarantee
from calibserve.server.ids import ResponseIdSigner
from calibserve.server.metrics import ServerMetrics, server_registry
from calibserve.server.probes import OnwardTier, ProbeMetrics, ProbeRunner, ProbeSet
from calibserve.server.recalibration import RecalibrationMetrics, Recalibrator

log = logging.getLogger("calibserve.server")


def load_calibration(path: Path | None) -> CalibrationDocument | None:
    """A tier's calibration document (None: the tier has none), through the one loader; a bad
    file is a `CalibrationError` (a ValueError) naming the file and the field or version."""
    if path is None:
        return None
    return CalibrationDocument.load(path)


def _transport_for(url: str) -> LeanTransport | None:
    """The lean transport for plain-http upstreams; httpx's own (TLS and all) for the rest."""
    return LeanTransport() if url.startswith("http://") else None


class TierRuntime:
    """One tier's live parts: its upstream client(s), optional managed engine and scorer."""

    def __init__(self, settings: TierSettings, metrics: ServerMetrics, route: str,
                 routing_metrics: RoutingMetrics) -> None:
        self.settings = settings
        self.calibration = load_calibration(settings.calibration_path())
        if self.calibration is None:
            log.warning("tier %s: no calibration.json; serving `mean` confidence with the "
                        "identity calibrator", settings.name)
        self.scorer = Scorer.from_document(self.calibration)
        self.engine: ManagedEngine | None = None
        self.upstream_model = settings.upstream_model or settings.name
        if settings.model is not None:
            metrics.engine_up.labels(settings.name).set(0)
            metrics.engine_restarts.labels(settings.name)
            self.engine = ManagedEngine(
                settings.name, settings.model, settings.engine,
                served_model_name=self.upstream_model,
                on_up=lambda up: metrics.engine_up.labels(settings.name).set(int(up)),
                on_restart=lambda: metrics.engine_restarts.labels(settings.name).inc(),
                verify=serves_verify(self.scorer),
            )
            # A local engine restarting refuses connections: retrying would only delay the 503.
            self.upstream: UpstreamClient = Upstream(
                settings.name, self.engine.url, timeout=settings.timeout_s,
                retry=RetryPolicy(max_attempts=1),
                breaker=CircuitBreaker(failure_threshold=1_000_000),
                transport=_transport_for(self.engine.url), metrics=routing_metrics,
            )
        else:
            replicas = [
                Upstream(
                    settings.name if len(settings.upstreams) == 1 else f"{settings.name}#{i}",
                    url, api_key=settings.resolved_api_key(), timeout=settings.timeout_s,
                    transport=_transport_for(url), metrics=routing_metrics,
                )
                for i, url in enumerate(settings.upstreams)
            ]
            self.upstream = replicas[0] if len(replicas) == 1 else ReplicaPool(
                settings.name, replicas)
        self.tier = Tier(model=self.upstream_model, upstream=self.upstream,
                         scorer=self.scorer, name=settings.name)

    @property
    def up(self) -> bool:
        return self.engine.up if self.engine is not None else True

    async def discover_model(self) -> None:
        """External upstreams: learn the model name they serve when the config did not say."""
        if self.engine is not None or self.settings.upstream_model:
            return
        try:
            ids = await served_models(self.upstream)
        except Exception as exc:  # noqa: BLE001 - startup must not die on a sleeping upstream
            log.warning("tier %s: cannot list upstream models (%s); assuming %r",
                        self.settings.name, exc, self.upstream_model)
            return
        chosen = choose_model(ids, self.settings.name)
        if chosen is None:
            log.warning("tier %s: upstream serves %s; assuming %r", self.settings.name, ids,
                        self.upstream_model)
            return
        self.upstream_model = chosen
        self.tier.model = chosen

    async def probe(self, timeout: float = 1.0) -> bool:
        """Is the tier answering? Managed: engine state; external: any HTTP answer to /health."""
        if self.engine is not None:
            return self.engine.up
        return await probe_health(self.upstream.base_url, timeout)


class ModelRuntime:
    """A client-visible model name: its route and its tiers."""

    def __init__(self, settings: ModelSettings, metrics: ServerMetrics,
                 routing_metrics: RoutingMetrics) -> None:
        self.settings = settings
        self.name = settings.name
        self.tiers = [TierRuntime(settings, metrics, settings.name, routing_metrics)] + [
            TierRuntime(t, metrics, settings.name, routing_metrics) for t in settings.escalate_to
        ]
        self.primary = self.tiers[0]
        for middle in self.tiers[1:-1]:  # a route of 3+ tiers: each judged by its own policy
            middle.tier.policy = self._middle_policy(middle)
        kwargs: dict[str, Any] = {}
        if settings.stream_mode:
            kwargs["stream_mode"] = settings.stream_mode
        self.route = Route(settings.name, [t.tier for t in self.tiers], policy=self._policy(),
                           **kwargs)
        self.created = int(time.time())

    def calibration_label(self, served_by: str) -> str:
        """The `model` label an answer's feedback is counted under.

        An escalated answer carries the stronger tier's confidence: counting it with the primary's
        would mix two models' calibration into one ECE, so each tier gets its own label.
        """
        return self.name if served_by == self.primary.tier.name else f"{self.name}:{served_by}"

    @property
    def calibration_labels(self) -> set[str]:
        return {self.calibration_label(t.tier.name) for t in self.tiers}

    def label_methods(self) -> dict[str, tuple[str, ...]]:
        """Per calibration label: the methods its tier serves (multiple-choice first)."""
        out: dict[str, tuple[str, ...]] = {}
        for t in self.tiers:
            scorer = t.scorer
            names = [scorer.multiple_choice.name, scorer.free_form.name]
            if scorer.multiple_choice.kind.option_letters:
                names.append(scorer.no_letter.name)
            if scorer.extra is not None:
                names.append(scorer.interim_method.name)
            out[self.calibration_label(t.tier.name)] = tuple(dict.fromkeys(names))
        return out

    def _policy(self) -> Policy:
        """The route's policy: what judges the primary's answer, from the primary's document."""
        s = self.settings
        kind = s.resolved_policy()
        if kind == "never" or len(self.tiers) < 2:
            return NeverPolicy()
        if kind == "budget":
            if s.budget is None:
                raise ValueError(f"model {s.name!r}: policy budget needs `budget` (a rate)")
            return BudgetPolicy(s.budget)
        if s.threshold == "guaranteed":
            if self.primary.calibration is None:
                raise ValueError(f"model {s.name!r}: threshold guaranteed needs a "
                                 "calibration.json with certified thresholds")
            return ThresholdPolicy.guaranteed(self.primary.calibration, s.max_error,
                                              uncalibrated=s.uncalibrated)
        if s.threshold is None or s.threshold == "auto":
            if self.primary.calibration is None:
                raise ValueError(f"model {s.name!r}: threshold auto needs a calibration.json; "
                                 "give --threshold FLOAT")
            return ThresholdPolicy.auto(self.primary.calibration, s.target_accuracy,
                                        uncalibrated=s.uncalibrated)
        return ThresholdPolicy(float(s.threshold), uncalibrated=s.uncalibrated)

    def _middle_policy(self, tier: TierRuntime) -> Policy | None:
        """What judges a middle tier's answer (a route of 3+ tiers; None: served as is), built
        as the primary's is but from that tier's own calibration.json (`--escalate-calibration`
        in its position, or the YAML tier's `calibration:`), so a route `calibserve certify`
        certified tier by tier keeps its guarantee live:

        - `threshold: guaranteed`: that tier's certified threshold for `max_error`; a tier with
          no document, or none certified for it, is refused (the route's promise would not
          hold for the answers it keeps);
        - `auto`: that tier's thresholds for `target_accuracy` (a document without them is
          refused, as the primary's is); a tier with no document keeps serving its answers as
          they are, with a warning;
        - a fixed threshold: the same calibrated-confidence threshold as the primary's;
        - `budget` and `never`: None: only the primary is judged (a budget is a rate of the
          route's traffic, not of one tier's).
        """
        s = self.settings
        if s.resolved_policy() != "threshold":
            return None
        name = tier.settings.name
        if s.threshold == "guaranteed":
            if tier.calibration is None:
                raise ValueError(
                    f"model {s.name!r}: tier {name!r} has no calibration.json; threshold "
                    "guaranteed judges every tier before the last by its own certified "
                    "threshold (give it --escalate-calibration, certified by `calibserve "
                    "certify`), or the route's guarantee would not hold")
            try:
                policy = ThresholdPolicy.guaranteed(tier.calibration, s.max_error,
                                                    uncalibrated=s.uncalibrated)
            except ValueError as exc:
                raise ValueError(f"model {s.name!r}: tier {name!r}: {exc}") from None
            doc = tier.calibration
            cert = doc.method(doc.multiple_choice).guarantee_for(s.max_error)
            position = self.tiers.index(tier)
            if cert is not None and cert.tier != position:
                made = ("by `calibserve calibrate`/`merge`, on every item" if cert.tier is None
                        else f"for tier {cert.tier} of a route")
                raise ValueError(
                    f"model {s.name!r}: tier {name!r}: its certificate for max_error "
                    f"{cert.max_error:g} was made {made}, not for tier {position} of this "
                    "route on what the earlier tiers leave; certify the route with "
                    "`calibserve certify`")
            return policy
        if s.threshold is None or s.threshold == "auto":
            if tier.calibration is None:
                log.warning("model %s: tier %s has no calibration.json: its answers are served "
                            "without a threshold of their own (give it --escalate-calibration "
                            "for threshold auto)", s.name, name)
                return None
            try:
                return ThresholdPolicy.auto(tier.calibration, s.target_accuracy,
                                            uncalibrated=s.uncalibrated)
            except ValueError as exc:
                raise ValueError(f"model {s.name!r}: tier {name!r}: {exc}") from None
        return ThresholdPolicy(float(s.threshold), uncalibrated=s.uncalibrated)

    @property
    def fast_fail(self) -> bool:
        """Only a managed primary with no other tier: a down engine means an immediate 503."""
        return len(self.tiers) == 1 and self.primary.engine is not None and not self.primary.up


class ServerRuntime:
    """Everything a running server holds; one per app."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        # One registry for the server's series and routing's: /metrics renders it alone.
        registry = server_registry()
        self.metrics = ServerMetrics(registry)
        self.routing_metrics = RoutingMetrics(registry)
        key = settings.resolved_signing_key()
        if key is None:
            log.warning("no signing key (--signing-key or CALIBSERVE_SIGNING_KEY): using a random "
                        "one; feedback for this replica's responses works on this replica only, "
                        "and not after a restart")
            key = ResponseIdSigner.random_key()
        self.signer = ResponseIdSigner(key)
        self.models: dict[str, ModelRuntime] = {}
        for model in settings.models:
            self.models[model.name] = ModelRuntime(model, self.metrics, self.routing_metrics)
            self.metrics.init_model(
                model.name, self.models[model.name].label_methods()[model.name])
        self.router = Router([m.route for m in self.models.values()],
                             metrics=self.routing_metrics)
        self.feedback = FeedbackRecorder(
            self.signer, self.metrics,
            {label for m in self.models.values() for label in m.calibration_labels},
            settings.feedback_ttl_s,
            settings.feedback_memory,
            {label: methods[0] for m in self.models.values()
             for label, methods in m.label_methods().items()},
        )
        self.probes = self._probe_runners(registry)
        self.recalibrators = self._recalibrators(registry)
        self.live_guarantees = self._live_guarantees(registry)
        fit = FitReference(registry)
        for served in self.models.values():
            # After a stored recalibration was adopted: the document served now.
            fit.publish(served.name, served.primary.calibration)
            recal = self.recalibrators.get(served.name)
            if recal is not None:
                recal.on_swap = lambda doc, name=served.name: self._swapped(fit, name, doc)
        self.started = False

    def _probe_runners(self, registry: Any) -> list[ProbeRunner]:
        """One runner per model with a probe set, when probes are on (server/probes.py)."""
        if self.settings.probe_rate <= 0:
            return []
        probe_metrics = ProbeMetrics(registry)
        runners = []
        for model in self.models.values():
            path = model.settings.probe_path()
            if path is None:
                log.warning("model %s: probes are on but there is no probe set (--probe-data, "
                            "or probes.jsonl next to calibration.json): no probes", model.name)
                continue
            methods = model.label_methods()
            onward = []  # the judged middle tiers a probe the tier before escalates goes on to
            for index in range(1, len(model.tiers)):
                if model.route.policy_for(index) is None:
                    break
                label = model.calibration_label(model.tiers[index].tier.name)
                onward.append(OnwardTier(label, model.tiers[index].tier, methods[label]))
            runners.append(ProbeRunner(
                model.name, model.primary.tier, ProbeSet.load(path), self.settings.probe_rate,
                self.metrics, probe_metrics, methods[model.name], onward=onward,
                policy_for=model.route.policy_for))
        return runners

    def _recalibrators(self, registry: Any) -> dict[str, Recalibrator]:
        """Per model with a calibration.json, when `recalibrate` is shadow or on; fed by its
        probes and by accepted feedback for its primary tier (server/recalibration.py)."""
        s = self.settings
        if s.recalibrate == "off":
            return {}
        metrics = RecalibrationMetrics(registry)
        out = {name: Recalibrator(model, s.recalibrate, s.recalibration_dir, metrics)
               for name, model in self.models.items() if model.primary.calibration is not None}
        for runner in self.probes:
            recal = out.get(runner.model)
            if recal is not None:
                runner.on_outcome = recal.observe

        def feedback(label: str, method: str, raw: float, correct: bool) -> None:
            recal = out.get(label)  # the primary tier's label is the model's name
            if recal is not None:
                recal.observe(method, raw, correct)

        self.feedback.on_outcome = feedback
        return out

    def _live_guarantees(self, registry: Any) -> dict[str, LiveGuarantee]:
        """Per model served with `threshold: guaranteed`: the certified thresholds of every tier
        it judges (the primary, and the middle tiers of a route of 3+) watched on the probes
        (primary) and accepted feedback of that tier (server/guarantee.py), keyed by the tier's
        calibration label (the model's name for the primary)."""
        watched = [(model, index) for model in self.models.values()
                   if model.settings.threshold == "guaranteed"
                   for index in range(len(model.tiers))
                   if isinstance(model.route.policy_for(index), ThresholdPolicy)]
        if not watched:
            return {}
        metrics = GuaranteeMetrics(registry)
        out: dict[str, LiveGuarantee] = {}
        for model, index in watched:
            tier_live = LiveGuarantee(model, metrics, index=index)
            out[tier_live.label] = tier_live
        for runner in self.probes:
            live = out.get(runner.model)
            if live is not None:
                runner.on_outcome = _both(runner.on_outcome, live.observe)
            runner.on_onward_outcome = self._observe_onward(out)
        previous = self.feedback.on_outcome

        def feedback(label: str, method: str, raw: float, correct: bool) -> None:
            if previous is not None:
                previous(label, method, raw, correct)
            live = out.get(label)  # a tier's calibration label (the primary's: the model's name)
            if live is not None:
                live.observe(method, raw, correct)

        self.feedback.on_outcome = feedback
        return out

    @staticmethod
    def _observe_onward(live: dict[str, LiveGuarantee]) -> Callable[[str, str, float, bool], None]:
        """A middle tier's probe outcome into that tier's live guarantee window."""

        def observe(label: str, method: str, raw: float, correct: bool) -> None:
            window = live.get(label)
            if window is not None:
                window.observe(method, raw, correct)

        return observe

    def _swapped(self, fit: FitReference, name: str, doc: CalibrationDocument) -> None:
        """A recalibrator served a new document: the fit-time gauges and the live guarantee
        follow it."""
        fit.publish(name, doc)
        live = self.live_guarantees.get(name)
        if live is not None:
            live.rescore()

    @property
    def engines(self) -> list[ManagedEngine]:
        return [t.engine for m in self.models.values() for t in m.tiers if t.engine is not None]

    async def start(self) -> None:
        """Start managed engines (concurrently) and discover external upstreams' model names."""
        engines = self.engines
        if engines:
            results = await asyncio.gather(*(e.start() for e in engines), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)
                raise errors[0]
        await asyncio.gather(*(t.discover_model() for m in self.models.values() for t in m.tiers))
        for runner in self.probes:
            runner.start()
        self.started = True

    async def stop(self) -> None:
        await asyncio.gather(*(runner.stop() for runner in self.probes))
        await self.router.aclose()
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)
        self.started = False

    async def ready(self) -> dict[str, bool]:
        """Per model: does its primary tier answer (or, failing that, any tier)?"""
        out: dict[str, bool] = {}
        for name, model in self.models.items():
            states = await asyncio.gather(*(t.probe() for t in model.tiers))
            out[name] = bool(states[0]) or any(states)
        return out


def _both(first: Callable[[str, float, bool], None] | None,
          then: Callable[[str, float, bool], None]) -> Callable[[str, float, bool], None]:
    """A probe outcome listener that calls `first` (if any), then `then`."""

    def listener(method: str, raw: float, correct: bool) -> None:
        if first is not None:
            first(method, raw, correct)
        then(method, raw, correct)

    return listener
