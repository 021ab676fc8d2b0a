"""Processes the served benchmark runs, and the client that drives them (openai SDK).

- `engine`: a bare vLLM engine started with calibserve's own managed-engine command line
  (`server.engine.build_command`, the CPU defaults plus `--enforce-eager`), for
  `calibserve calibrate --upstream`;
- `calibserve_serve`: `calibserve serve --config` (a managed engine on the checkpoint, the
  calibration.json just fitted) as a user starts it;
- `drive`: prompts through `openai.AsyncOpenAI` against that server, each answer appended to a
  JSONL file as it arrives, so an interrupted step resumes where it stopped.

Each process logs to a file named when it starts; a process that does not come up within its
timeout is killed and its log tail raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = ["ServeFailed", "calibserve_serve", "done_keys", "drive", "engine"]

ENGINE_ARGS = ("--enforce-eager",)  # torch.compile of 30 layers: 186 s to healthy, eager 48 s


class ServeFailed(RuntimeError):
    """A process did not come up, or a request failed."""


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeFailed(f"exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(2)
    raise ServeFailed(f"not up after {timeout_s:.0f} s; log {log}:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _popen(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        # Own process group: stopping it stops vLLM's worker processes too.
        return subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(env or os.environ), start_new_session=True)


@contextlib.contextmanager
def engine(model_dir: Path, name: str, log: Path, max_model_len: int,
           timeout_s: float = 600) -> Iterator[str]:
    """A vLLM engine on `model_dir` with the managed engine's command line; yields its URL."""
    from calibserve.server.config import EngineSettings
    from calibserve.server.engine import build_command, cuda_available
    from calibserve.server.ports import free_port

    port = free_port()
    settings = EngineSettings(max_model_len=max_model_len, extra_args=list(ENGINE_ARGS))
    cmd, env = build_command(model_dir, name, "127.0.0.1", port, settings, cuda_available())
    proc = _popen(cmd, log, env)
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc, log, timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def calibserve_serve(model_dir: Path, name: str, calibration: Path, workdir: Path,
                     max_model_len: int, timeout_s: float = 600) -> Iterator[str]:
    """`calibserve serve --config` on `model_dir` served with `calibration`; yields its URL."""
    from calibserve.server.ports import free_port

    port = free_port()
    config = {
        "host": "127.0.0.1", "port": port, "log_level": "warning",
        "models": [{
            "name": name, "model": str(model_dir), "calibration": str(calibration),
            "engine": {"max_model_len": max_model_len, "extra_args": list(ENGINE_ARGS)},
        }],
    }
    cfg = workdir / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "calibserve", "serve", "--config", str(cfg)]
    log = workdir / "serve.log"
    proc = _popen(cmd, log)
    try:
        _wait(f"http://127.0.0.1:{port}/ready", proc, log, timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def done_keys(path: Path) -> set[int]:
    """Item indices already answered in a results JSONL (a torn last line is ignored)."""
    keys: set[int] = set()
    if path.is_file():
        for line in path.read_text().split("\n"):
            with contextlib.suppress(ValueError, KeyError):
                keys.add(int(json.loads(line)["i"]))
    return keys


async def _drive(url: str, model: str, prompts: Mapping[int, str], out: Path, max_tokens: int,
                 concurrency: int, desc: str, completion: str | None) -> None:
    import openai
    from tqdm import tqdm

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600,
                                max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=desc, unit="item")

    async def one(i: int, prompt: str) -> dict[str, Any]:
        async with gate:
            if completion is None:
                chat = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens, temperature=0.0,
                )
                choice: Any = chat.choices[0]
                reply = choice.message.content or ""
            else:  # a base model: the question inside a plain-text prompt, one line back
                done = await client.completions.create(
                    model=model, prompt=completion.format(question=prompt),
                    max_tokens=max_tokens, temperature=0.0, stop=["\n"],
                )
                choice = done.choices[0]
                reply = choice.text or ""
        conf = (choice.model_extra or {}).get("confidence")
        if not isinstance(conf, dict):
            raise ServeFailed(f"item {i}: the response has no confidence: {choice}")
        return {"i": i, "reply": reply, "confidence": conf}

    with out.open("a") as fh:
        tasks = [asyncio.create_task(one(i, p)) for i, p in prompts.items()]
        try:
            for fut in asyncio.as_completed(tasks):
                fh.write(json.dumps(await fut) + "\n")
                fh.flush()
                bar.update()
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
            await client.close()


def drive(url: str, model: str, prompts: Mapping[int, str], out: Path, *, max_tokens: int,
          concurrency: int = 8, desc: str = "served", completion: str | None = None) -> None:
    """Send every prompt not yet in `out` as one user chat message (or, with `completion`, a
    template holding `{question}`, as a `/v1/completions` prompt that stops at the first
    newline); append each answer."""
    todo = {i: p for i, p in prompts.items() if i not in done_keys(out)}
    if todo:
        asyncio.run(_drive(url, model, todo, out, max_tokens, concurrency, desc, completion))
