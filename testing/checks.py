"""Checks tests and benchmarks share: OpenAI's error shape and calibserve's /metrics."""

from __future__ import annotations

import json
import re
import socket
import struct
from typing import Any

import httpx

from calibserve.testing.fake_upstream import FAKE_MODEL

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def is_openai_error(body: Any) -> bool:
    """`{"error": {"message": str, "type": str, "param": str|null, "code": str|int|null}}`."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (isinstance(err, dict) and isinstance(err.get("message"), str)
            and isinstance(err.get("type"), str) and "param" in err and "code" in err
            and (err["param"] is None or isinstance(err["param"], str))
            and (err["code"] is None or isinstance(err["code"], str | int)))


def error_shape_ok(response: httpx.Response) -> bool:
    try:
        return is_openai_error(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric_sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
               **labels: str) -> float:
    """Sum of every sample called `name` whose labels include `labels`."""
    total = 0.0
    for (sample, lbls), value in metrics.items():
        if sample != name:
            continue
        d = dict(lbls)
        if all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def calibration_counters(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
                         ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Only the per-bin calibration series (what feedback abuse must never move)."""
    return {k: v for k, v in metrics.items() if k[0].startswith("calibserve_calibration_")
            or k[0] == "calibserve_ece"}


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 8}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (Linux TCP_INFO's first byte), read without reading any
    data: a reader that never reads can still see the server's close."""
    return int(struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0])


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in exposition")


def total(text: str, name: str, **labels: str) -> float:
    """Sum of all series of `name` whose labels include `labels`."""
    out = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                out += float(line.rsplit(" ", 1)[1])
    return out
