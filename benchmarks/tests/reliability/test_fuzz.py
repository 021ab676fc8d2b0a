"""A few hundred schemathesis-generated requests against calibserve over the FAKE upstream."""

from __future__ import annotations

from benchmarks.reliability.fuzz import FINDING_KINDS, fuzz
from benchmarks.reliability.harness import CASCADE_MODEL
from calibserve.testing.checks import metric_sum, scrape
from calibserve.testing.fake_upstream import FakeUpstream
from calibserve.testing.servers import InProcessServer


def test_fuzz_finds_no_server_errors(rel_server: InProcessServer, fake: FakeUpstream) -> None:
    def hops() -> float:  # requests the 3-tier route's judged middle tier sent on to the expert
        return metric_sum(scrape(rel_server.url), "calibserve_escalations_total",
                          route=CASCADE_MODEL, tier="expert")

    before = hops()
    report = fuzz(rel_server.url, 300, seed=1, also=(CASCADE_MODEL,))
    assert report.requests >= 250
    # Generation must reach past validation: real answers and real feedback ids, not only 4xx.
    assert report.kinds["ok"] >= 20
    assert report.by_op_status["POST /v1/feedback"][200] >= 1
    assert {k: report.kinds[k] for k in FINDING_KINDS} == dict.fromkeys(FINDING_KINDS, 0), \
        report.examples
    # Healthy fake upstream: no upstream-mapped 5xx either.
    assert report.kinds["upstream_5xx"] == 0, report.examples
    assert report.checks.get("JsonSchemaError", 0) == 0, report.examples
    # Fuzzed requests reached the route of three tiers and its judged middle tier.
    assert hops() > before


def test_openapi_describes_calibserve_bodies(rel_server: InProcessServer) -> None:
    import httpx

    from benchmarks.reliability.fuzz import check_doc

    doc = httpx.get(f"{rel_server.url}/openapi.json", timeout=10).json()
    assert check_doc(doc) == {"missing": [], "notes": []}
