"""Every metric name in the Grafana dashboard and the Prometheus rules is one calibserve exports
(scraped live from create_app's /metrics, plus what ServerMetrics and RoutingMetrics define),
or a recording rule from deploy/prometheus/rules.yml."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.tools import DASHBOARD, RULES, metric_names

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                             "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created")}


def sample_names(family: str, kind: str) -> set[str]:
    base = family.removesuffix("_total") if kind == "counter" else family
    names = {base + s for s in SUFFIXES.get(kind, ("",))}
    if kind == "counter" and not family.endswith("_total"):
        names.add(family)  # hand-rendered counters such as calibserve_calibration_confidence_sum
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Names from a real /metrics scrape of an app with one model, and every family the metric
    classes define (some have no samples until traffic arrives)."""
    from calibserve.routing import RoutingMetrics
    from calibserve.server.app import create_app
    from calibserve.server.config import ServerSettings
    from calibserve.server.guarantee import GuaranteeMetrics
    from calibserve.server.metrics import ServerMetrics
    from calibserve.server.probes import ProbeMetrics

    settings = ServerSettings.model_validate({
        "models": [{"name": "m", "upstreams": ["http://127.0.0.1:9/v1"], "upstream_model": "m"}],
        "signing_key": "test-only",
    })
    client = TestClient(create_app(settings))  # no lifespan: nothing is contacted
    text = client.get("/metrics").text
    names: set[str] = set()
    types: dict[str, str] = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for family, kind in types.items():
        names |= sample_names(family, kind)
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
    registry = CollectorRegistry()
    ServerMetrics(registry)
    RoutingMetrics(registry)
    ProbeMetrics(registry)  # only built when probes are on
    GuaranteeMetrics(registry)  # only built with threshold: guaranteed
    collectors = [*registry._collector_to_names]  # noqa: SLF001 - the only list of collectors
    for collector in collectors:
        for family in collector.collect():
            names |= sample_names(family.name, family.type)
    return names


def recorded() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"]
            for r in g["rules"] if "record" in r}


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, query
            yield f"variable {var['name']}", match.group(1)


def rule_queries() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule.get("record") or rule["alert"], rule["expr"]


def test_name_extraction() -> None:
    expr = ('sum by (model, bin) (increase(a_total{x="y",bin=~"1|2"}[1h])) / on(model) '
            'group_left(bin) b:c:1h offset 1d > bool 1e-12 and abs(c) < inf')
    assert metric_names(expr) == {"a_total", "b:c:1h", "c"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{m=~"$model"}'
                        '[$__rate_interval])))') == {"x_bucket"}


def test_live_scrape_has_the_documented_families(exported: set[str]) -> None:
    for name in ["calibserve_calibration_samples_total", "calibserve_calibration_confidence_sum",
                 "calibserve_calibration_correct_total", "calibserve_confidence_bucket",
                 "calibserve_escalations_total", "calibserve_request_duration_seconds_bucket"]:
        assert name in exported


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_queried_metric_is_exported(exported: set[str], source: str) -> None:
    queries = list(dashboard_queries() if source == "dashboard" else rule_queries())
    known = exported | recorded()
    unknown = {(where, name) for where, expr in queries for name in metric_names(expr)
               if name not in known}
    assert not unknown, f"names calibserve does not export: {sorted(unknown)}"


def test_dashboard_covers_what_issue_7_asks_for() -> None:
    used = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    for name in ["model:calibserve_calibration_ece:1h",          # ECE over time
                 "calibserve_calibration_correct_total",          # reliability diagram
                 "calibserve_calibration_confidence_sum",
                 "calibserve_confidence_bucket",                  # confidence histogram
                 "route:calibserve_escalation_rate:ratio_rate5m",  # escalation rate
                 "calibserve_escalation_agreement_total",          # agreement
                 "calibserve_request_duration_seconds_bucket",     # latency
                 "calibserve_proxy_overhead_seconds_bucket",       # proxy overhead
                 "calibserve_circuit_state", "calibserve_engine_up"]:  # upstream health
        assert name in used, name
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
