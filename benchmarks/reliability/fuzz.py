"""Schema-driven fuzzing of calibserve with schemathesis, from the OpenAPI document it publishes.

Requests are generated from `/openapi.json` (valid and deliberately invalid bodies, both
generation modes) and sent to a running calibserve. Every answer is classified:

- `server_5xx`: a 5xx calibserve caused itself (500, or anything that is not an
  upstream-mapped 502/503/504): a finding;
- `upstream_5xx`: a documented 502/503/504 (expected only when the upstream fails; in front of
  the healthy fake upstream these are findings too, counted apart);
- `engine_5xx`: a 5xx the engine answered itself, passed through as it came (marked
  `x-calibserve-error-source: engine`; a real engine answers 500 to some valid bodies, e.g.
  grammars its tokenizer cannot compile): not calibserve's, counted apart;
- `bad_error_shape`: a 4xx/5xx whose body is not OpenAI's `{"error": {...}}`: a finding;
- `bad_success`: a 200 chat/completions JSON answer without per-choice `confidence` or the
  `calibserve` object: a finding;
- `transport`: no HTTP answer at all (reset, timeout): a finding (crash or hang);
- schemathesis's own checks (`response_schema_conformance`, `status_code_conformance`,
  `content_type_conformance`) are reported by check name: doc/implementation mismatches.

The generator steers `model` to a served model half the time (in turn the plain one and, over
the FAKE upstream, CASCADE_MODEL: a route of three tiers whose middle tier is judged by its own
threshold) and `id` (feedback) to real signed ids a third of the time, so fuzzing reaches the
upstream path, the escalation path of every tier, and the accept/409 path rather than stopping
at "unknown model" / "malformed id".

    python -m benchmarks.reliability.fuzz --requests 1200              # fake upstream, in-process
    python -m benchmarks.reliability.fuzz --url http://127.0.0.1:18650 --model NAME --requests 200
    python -m benchmarks.reliability.fuzz --managed /work/dev-demo/aligned --requests 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.reliability.harness import (
    CASCADE_MODEL,
    FAKE_MODEL,
    SIGNING_KEY,
    UPSTREAM_STATUSES,
    CalibserveProcess,
    FakeUpstream,
    InProcessServer,
    cascade_model,
    chat_body,
    is_openai_error,
    write_result,
)

# Share of the request budget per operation (POST bodies are where the bugs live).
WEIGHTS: dict[tuple[str, str], float] = {
    ("POST", "/v1/chat/completions"): 0.34,
    ("POST", "/v1/completions"): 0.28,
    ("POST", "/v1/feedback"): 0.18,
    ("POST", "/v1/responses"): 0.06,
    ("POST", "/tokenize"): 0.02,
    ("POST", "/detokenize"): 0.02,
    ("GET", "/v1/models/{model}"): 0.06,
    ("GET", "/v1/models"): 0.02,
    ("GET", "/health"): 0.02,
    ("GET", "/ready"): 0.02,
    ("GET", "/metrics"): 0.02,
}
SCHEMATHESIS_CHECKS = ("response_schema_conformance", "status_code_conformance",
                       "content_type_conformance")
FINDING_KINDS = ("server_5xx", "bad_error_shape", "bad_success", "transport")


@dataclass
class Example:
    kind: str
    operation: str
    status: int | None
    request: str
    response: str


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    by_op_status: dict[str, Counter[int]] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    examples: list[Example] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def findings(self) -> int:
        return sum(self.kinds[k] for k in FINDING_KINDS)

    def add_example(self, ex: Example, limit: int = 3) -> None:
        if sum(1 for e in self.examples if e.kind == ex.kind) < limit:
            self.examples.append(ex)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 2),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_operation": dict(self.by_operation),
            "by_operation_status": {k: dict(v) for k, v in self.by_op_status.items()},
            "kinds": dict(self.kinds),
            "checks": dict(self.checks),
            "findings": self.findings,
            "doc": self.doc,
            "examples": [asdict(e) for e in self.examples],
        }


MAX_STREAM_EVENTS = 100_000


def check_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Does the OpenAPI document describe calibserve's own bodies? Returns what is missing."""
    schemas = doc.get("components", {}).get("schemas", {})
    missing: list[str] = []

    def props(name: str) -> dict[str, Any]:
        return schemas.get(name, {}).get("properties", {})

    for choice in ("ChatChoice", "CompletionChoice"):
        if "confidence" not in props(choice):
            missing.append(f"{choice}.confidence")
    for body in ("ChatCompletionResponse", "CompletionResponse"):
        if "calibserve" not in props(body):
            missing.append(f"{body}.calibserve")
    for f in ("score", "raw", "method", "calibrated"):
        if f not in props("ConfidenceModel"):
            missing.append(f"ConfidenceModel.{f}")
    for f in ("id", "correct"):
        if f not in props("FeedbackRequest"):
            missing.append(f"FeedbackRequest.{f}")
    paths = doc.get("paths", {})
    if "/v1/feedback" not in paths:
        missing.append("/v1/feedback")
    notes: list[str] = []
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = (paths.get(path, {}).get("post", {}).get("responses", {}).get("200", {})
                   .get("content", {}))
        if "text/event-stream" not in content:
            notes.append(f"{path}: the stream: true answer (text/event-stream) is not "
                         "described as a response content type")
        responses = paths.get(path, {}).get("post", {}).get("responses", {})
        if "422" in responses:
            notes.append(f"{path}: documents 422 (FastAPI default) though invalid bodies get 400")
    return {"missing": missing, "notes": notes}


def classify(operation: str, status: int | None, body: bytes, content_type: str,
             source: str = "") -> str:
    """The harness's verdict on one answer (see the module docstring); `source` the answer's
    `x-calibserve-error-source` header."""
    if status is None:
        return "transport"
    if status >= 500 and source == "engine":
        return "engine_5xx" if _json_error(body) else "bad_error_shape"
    if status >= 500:
        if status not in UPSTREAM_STATUSES:
            return "server_5xx"
        return "upstream_5xx" if _json_error(body) else "bad_error_shape"
    if status >= 400:
        return "client_4xx" if _json_error(body) else "bad_error_shape"
    if operation in ("POST /v1/chat/completions", "POST /v1/completions"):
        if content_type.startswith("text/event-stream"):
            return "ok_stream" if _stream_ok(body) else "bad_success"
        try:
            obj = json.loads(body)
        except ValueError:
            return "bad_success"
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if (not isinstance(choices, list) or not isinstance(obj.get("calibserve"), dict)
                or any(not _confidence_ok(c.get("confidence")) for c in choices)):
            return "bad_success"
    return "ok"


def _json_error(body: bytes) -> bool:
    try:
        return is_openai_error(json.loads(body))
    except ValueError:
        return False


def _confidence_ok(conf: Any) -> bool:
    return (isinstance(conf, dict) and isinstance(conf.get("score"), int | float)
            and 0.0 <= conf["score"] <= 1.0 and isinstance(conf.get("method"), str)
            and isinstance(conf.get("calibrated"), bool))


def _stream_ok(body: bytes) -> bool:
    """A stream ends with [DONE], its last data chunk carries `calibserve`, no error event."""
    events = [line[6:] for line in body.decode(errors="replace").splitlines()
              if line.startswith("data: ")]
    if not events or events[-1].strip() != "[DONE]":
        return False
    chunks = []
    for e in events[:-1]:
        try:
            chunks.append(json.loads(e))
        except ValueError:
            return False
    if any("error" in c for c in chunks):
        return False
    return bool(chunks) and isinstance(chunks[-1].get("calibserve"), dict)


def real_ids(base_url: str, model: str, count: int, headers: dict[str, str]) -> list[str]:
    """Signed ids issued by the server under test, for steering feedback bodies."""
    ids: list[str] = []
    with httpx.Client(timeout=30, headers=headers) as client:
        for _ in range(count):
            r = client.post(f"{base_url}/v1/chat/completions",
                            json={**chat_body(), "model": model})
            if r.status_code == 200:
                ids.append(r.json()["id"])
    return ids


def fuzz(  # noqa: C901 - one schemathesis run; its closures share the run's state
    base_url: str,
    total: int,
    model: str = FAKE_MODEL,
    seed: int = 0,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    also: tuple[str, ...] = (),
) -> FuzzReport:
    """Send about `total` generated requests to calibserve at `base_url`; classify the answers.
    `also`: other served models a steered `model` goes to in turn with `model`."""
    import hypothesis.strategies as st
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.failures import Failure, FailureGroup
    from schemathesis.specs.openapi import checks as oa_checks

    headers = dict(headers or {})
    report = FuzzReport()
    doc = httpx.get(f"{base_url}/openapi.json", timeout=30, headers=headers).json()
    report.doc = check_doc(doc)
    schema = schemathesis.openapi.from_dict(doc)
    # schemathesis stops reading an event stream after 20 events by default; an answer with n=4
    # and 8 tokens has ~40. Read streams to the end, or a cut stream looks like one without [DONE].
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    ids = real_ids(base_url, model, 12, headers)
    targets = (model, *also)
    session = requests.Session()
    session.headers.update(headers)
    sts_checks = [getattr(oa_checks, name) for name in SCHEMATHESIS_CHECKS]
    started = time.perf_counter()

    def steer(case: Any, pick: tuple[bool, int, bool]) -> Any:
        to_model, which, to_id = pick
        body = case.body
        if isinstance(body, dict):
            if to_model and "model" in body:
                body["model"] = targets[which % len(targets)]
            if to_id and ids and "id" in body:
                body["id"] = ids[which % len(ids)]
            # The fake answers instantly; a real engine would spend minutes on a huge request.
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(key), int) and body[key] > 64:
                    body[key] = 64
        return case

    def record(case: Any) -> None:
        op = f"{case.method.upper()} {case.path}"
        report.requests += 1
        report.by_operation[op] += 1
        response = None
        try:
            response = case.call(base_url=base_url, session=session, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, not a crash
            report.kinds["transport"] += 1
            report.add_example(Example("transport", op, None, _req(case), repr(exc)[:300]))
        else:
            status = response.status_code
            ctype = response.headers.get("content-type", [""])
            ctype = ctype[0] if isinstance(ctype, list) else str(ctype)
            report.by_status[status] += 1
            report.by_op_status.setdefault(op, Counter())[status] += 1
            source = response.headers.get("x-calibserve-error-source", [""])
            source = source[0] if isinstance(source, list) else str(source)
            kind = classify(op, status, response.content, ctype, source)
            report.kinds[kind] += 1
            if kind in FINDING_KINDS or kind in ("upstream_5xx", "engine_5xx"):
                report.add_example(Example(kind, op, status, _req(case),
                                           response.content[:300].decode(errors="replace")))
            try:
                case.validate_response(response, checks=sts_checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    name = _check_name(failure)
                    report.checks[name] += 1
                    report.add_example(Example(f"check:{name}", op, status, _req(case),
                                               (failure.title or "")[:300]), limit=2)
            except Failure as failure:
                name = _check_name(failure)
                report.checks[name] += 1
        if progress is not None:
            progress(1)

    operations = [r.ok() for r in schema.get_all_operations()]
    for operation in operations:
        key = (operation.method.upper(), operation.path)
        budget = max(1, round(total * WEIGHTS.get(key, 0.02)))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            n = budget // 2 if mode is GenerationMode.POSITIVE else budget - budget // 2
            if n <= 0:
                continue
            strategy = st.builds(
                steer, operation.as_strategy(generation_mode=mode),
                st.tuples(st.booleans(), st.integers(0, 1000), st.integers(0, 2).map(
                    lambda x: x == 0)),
            )

            @hseed(seed)
            @settings(max_examples=n, database=None, deadline=None, derandomize=False,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case: Any) -> None:
                record(case)

            # Unsatisfiable: e.g. no invalid request exists for an operation without parameters.
            with contextlib.suppress(Unsatisfiable):
                run()
    report.seconds = time.perf_counter() - started
    session.close()
    return report


def _check_name(failure: Any) -> str:
    return f"{type(failure).__name__}"


def _req(case: Any) -> str:
    body = case.body if not callable(getattr(case, "body", None)) else None
    try:
        text = json.dumps(body, default=repr)
    except (TypeError, ValueError):
        text = repr(body)
    return f"{case.method.upper()} {case.formatted_path} {text[:300]}"


def render(report: FuzzReport, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    table.add_column("status")
    table.add_column("count", justify="right")
    for status, count in sorted(report.by_status.items()):
        table.add_row(str(status), str(count))
    console.print(table)
    console.print(f"requests {report.requests} in {report.seconds:.1f} s; kinds "
                  f"{dict(report.kinds)}; schemathesis checks {dict(report.checks)}")
    console.print(f"OpenAPI doc: {report.doc}")
    for ex in report.examples:
        console.print(f"[yellow]{ex.kind}[/] {ex.operation} -> {ex.status}: {ex.request} "
                      f"=> {ex.response}")


@contextlib.contextmanager
def _config(upstream: str) -> Iterator[Path]:
    """A `--config` file serving FAKE_MODEL and CASCADE_MODEL over `upstream`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / "calibserve.yaml"
        path.write_text(json.dumps({"models": [
            {"name": FAKE_MODEL, "upstreams": [upstream], "upstream_model": FAKE_MODEL},
            cascade_model(upstream)]}))
        yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--url", help="fuzz this running calibserve instead of starting one")
    parser.add_argument("--model", default=FAKE_MODEL)
    parser.add_argument("--managed", type=Path, help="fuzz calibserve with a managed REAL vLLM "
                        "engine for this checkpoint (slow: use a few hundred requests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 requests")
    parser.add_argument("--name", default="fuzz", help="results/NAME.json")
    args = parser.parse_args(argv)
    total = 300 if args.quick else args.requests
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("fuzzing", total=total)

        def tick(n: int) -> None:
            bar.advance(task, n)

        if args.managed:
            from calibserve.server.config import ServerSettings

            settings = ServerSettings.model_validate({
                "signing_key": SIGNING_KEY, "host": "127.0.0.1",
                "models": [{"name": "real", "model": str(args.managed),
                            "engine": {"max_model_len": 256}}]})
            with InProcessServer(settings) as srv:
                report = fuzz(srv.url, total, "real", args.seed, progress=tick)
            where = f"calibserve with a managed REAL vLLM engine ({args.managed})"
        elif args.url:
            report = fuzz(args.url, total, args.model, args.seed, progress=tick)
            where = f"calibserve at {args.url} (model {args.model})"
        else:
            with FakeUpstream() as fake, _config(fake.url) as config, CalibserveProcess(
                    ["--config", str(config), "--log-level", "warning"]) as proc:
                report = fuzz(proc.url, total, FAKE_MODEL, args.seed, progress=tick,
                              also=(CASCADE_MODEL,))
            where = f"calibserve (subprocess) over the FAKE upstream ({FAKE_MODEL}, " \
                    f"{CASCADE_MODEL})"
    render(report, f"fuzz: {where}")
    write_result(args.name, {"target": where, **report.to_dict()})
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
