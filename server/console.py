"""What `calibserve serve` (and `calibserve demo`) say on the console besides their log lines.

Once the server is ready, one short block: where to send requests, a request to copy (a real
question when the model has a probe set: the demo's prints an answer with its confidence), what
the `confidence` block in the answer means, and `/metrics` (the demo adds its merge report).
"Ready" is what a client sees: the block is printed when `/ready` first answers 200.

An engine that fails to start is one line: uvicorn logs a failed start-up as the lifespan's
whole traceback, which for `EngineStartError` (a message written to be read, with the engine's
log file in it; the engine has shown its last lines just before) says nothing more.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from calibserve.server.config import ServerSettings
from calibserve.server.engine import EngineStartError
from calibserve.server.engine_log import shown
from calibserve.server.probes import ProbeDataError, ProbeSet

DEFAULT_QUESTION = "What is the capital of France?"
DEFAULT_MAX_TOKENS = 16
POLL_S = 0.5


def base_url(settings: ServerSettings) -> str:
    """Where a client on this machine reaches the server (a wildcard address: loopback)."""
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def example_body(settings: ServerSettings) -> dict[str, object]:
    """A chat request for the first model: its first probe (a held-out question it was
    calibrated for) when it has a probe set, else a generic question."""
    model = settings.models[0]
    content, max_tokens = DEFAULT_QUESTION, DEFAULT_MAX_TOKENS
    path = model.probe_path()
    if path is not None:
        try:
            probes = ProbeSet.load(path).probes
        except ProbeDataError:
            probes = ()
        if probes:
            content, max_tokens = probes[0].content, probes[0].max_tokens
    return {"model": model.name, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens}


def example_request(settings: ServerSettings) -> str:
    """The example as one curl command line (shell-quoted)."""
    parts = ["curl", "-s", f"{base_url(settings)}/v1/chat/completions",
             "-H", "Content-Type: application/json"]
    quoted = " ".join(shlex.quote(p) for p in parts)
    if settings.api_keys:  # the key itself is never printed
        quoted += ' -H "Authorization: Bearer $CALIBSERVE_API_KEY"'
    return f"{quoted} -d {shlex.quote(json.dumps(example_body(settings)))}"


def ready_block(settings: ServerSettings, report: Path | None = None) -> str:
    """The lines printed once the server is ready."""
    url = base_url(settings)
    names = ", ".join(m.name for m in settings.models)
    models = "model" if len(settings.models) == 1 else "models"
    lines = [
        f"calibserve is ready: {url}/v1 (OpenAI-compatible API; {models}: {names})",
        f"  try:     {example_request(settings)}",
        '  answer:  each choice carries "confidence": "score" is the probability that it is '
        'right, calibrated when "calibrated" is true ("raw": the model\'s own, "method": how '
        'it was read)',
        f"  metrics: {url}/metrics   feedback on an answer: POST {url}/v1/feedback",
    ]
    if report is not None:
        lines.append(f"  report:  {shown(report)} (the merge: accuracy and ECE along the sweep)")
    return "\n".join(lines)


class Announcer:
    """Prints `ready_block` when `/ready` first answers 200: a daemon thread polls it until
    then, or until `cancel()` (the server stopped before it got there)."""

    def __init__(self, settings: ServerSettings, block: str, write: Callable[[str], None]
                 ) -> None:
        self.url = f"{base_url(settings)}/ready"
        self.block = block
        self.write = write
        self.announced = False
        self._cancelled = threading.Event()
        self.thread = threading.Thread(target=self._wait, name="calibserve-ready", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self._cancelled.is_set():
                try:
                    if client.get(self.url).status_code == 200:
                        self.write(self.block)
                        self.announced = True
                        return
                except httpx.HTTPError:
                    pass
                self._cancelled.wait(POLL_S)

    def cancel(self) -> None:
        self._cancelled.set()


def announce_when_ready(
    settings: ServerSettings,
    report: Path | None = None,
    write: Callable[[str], None] | None = None,
) -> Announcer | None:
    """Start an `Announcer` for `settings` (None when there is nothing to say: no model, or
    the port is chosen at bind time)."""
    if not settings.models or settings.port == 0:
        return None
    return Announcer(settings, ready_block(settings, report), write or _print)


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


_ENGINE_ERROR = f"{EngineStartError.__module__}.{EngineStartError.__qualname__}: "


class EngineStartFailureLine(logging.Filter):
    """Turns uvicorn's record of a start-up that failed on `EngineStartError` (the lifespan's
    traceback) into the error's own line; other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Traceback") and _ENGINE_ERROR in message:
            record.msg = message.rsplit(_ENGINE_ERROR, 1)[1].strip()
            record.args = ()
        return True


def one_line_engine_errors() -> None:
    """Install `EngineStartFailureLine` on uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, EngineStartFailureLine) for f in logger.filters):
        logger.addFilter(EngineStartFailureLine())
