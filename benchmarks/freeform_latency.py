"""What `verify` adds to a non-streaming request's latency, on the CPU demo (issue 12 floor: +30%).

One real vLLM CPU engine serves the merged demo model (or `--model DIR`); two calibserve servers
front it side by side, identical but for the calibration document's free-form method: `mean`
(the reply's own logprobs, no extra request) and `verify` (one extra prompt-only request per
reply, max_tokens 1, served by the same engine). Requests are the demo world's short-answer
questions and open prompts as plain user messages (chat) or raw prompts (completions), sent one
at a time and interleaved (mean, verify, then the engine probes below) so all see the same
engine state. Replies the multiple-choice method scores (option letters) cost no verify request
either way; the table reports both all requests and the free-form ones only.

Where the time goes, measured in the same loop straight against the engine (no calibserve):
`engine reply` (the client's request as calibserve forwards it), `engine verify text` (the
verify request as text: the conversation for chat, which vLLM renders and tokenises again, or
the prompt + reply + suffix for completions), `engine verify ids` (the same verify prompt as
token ids, one completions request: what calibserve sends since routing/verify_tokens.py), and
`engine floor` (a one-token completion of a one-token prompt: vLLM's fixed cost per request).
vLLM's prefix-cache counters are printed at the end.

The engine runs as `calibserve serve` runs a managed CPU engine: the model worker in the engine
core (`engine.cpu_worker_in_engine_core`: `VLLM_ENABLE_V1_MULTIPROCESSING=0`; `--vllm-placement`
keeps vLLM's own, a worker process that busy-polls beside the engine core) and, as for any tier
that serves verify, 32-token KV blocks (server/engine.py `VERIFY_CPU_BLOCK_SIZE`: verify's prompt
reuses the reply's cached blocks; `--engine-args "--block-size 128"` is vLLM's own CPU default).
Runs before 2026-12-06 measured vLLM's own placement and block size.

    CALIBSERVE_HOME=... .venv/bin/python benchmarks/freeform_latency.py [--requests 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import loadavg, machine, utc_now  # noqa: E402
from benchmarks.reliability.harness import InProcessServer  # noqa: E402
from calibserve.calibration import CalibrationDocument  # noqa: E402
from calibserve.server.config import ServerSettings  # noqa: E402
from calibserve.server.engine import VERIFY_CPU_BLOCK_SIZE  # noqa: E402
from calibserve.testing import vllm_process  # noqa: E402
from calibserve.testing.vllm_process import VLLMProcess  # noqa: E402


def prompts(data: Path, limit: int) -> list[str]:
    out: list[str] = []
    for name, key in (("open_prompts.jsonl", "prompt"), ("short_test.jsonl", "question")):
        for line in (data / name).read_text().splitlines():
            if line.strip():
                out.append(json.loads(line)[key])
    # Open prompts first (free-form replies), then short-answer questions, alternating.
    opens, shorts = out[:40], out[40:]
    mixed = [p for pair in zip(opens, shorts, strict=False) for p in pair]
    return (mixed + shorts[len(opens):])[:limit]


def document(model_dir: Path, free_form: str, out: Path,
             verify: dict[str, object] | None = None) -> Path:
    """The model's `answer` entry (its map and thresholds) plus `free_form` with no map of its
    own (`verify` params: the verdict token ids when the tokenizer has them). Read as plain
    JSON: a cached merge may carry fit fields of a newer writer."""
    path = model_dir / "calibration.json"
    data = json.loads(path.read_text()) if path.is_file() else {"methods": {"answer": {}}}
    answer = data["methods"].get("answer", {})
    methods: dict[str, object] = {
        "answer": {k: answer[k] for k in ("params", "calibrator", "thresholds") if k in answer},
        "mean": {}, free_form: {"params": verify} if free_form == "verify" and verify else {}}
    doc = CalibrationDocument.from_dict({"version": 2, "methods": methods,
                                         "multiple_choice": "answer", "free_form": free_form})
    return doc.write(out)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request(endpoint: str, text: str, max_tokens: int) -> tuple[str, dict[str, object]]:
    """Chat: the text as a plain user message (the demo template then asks for an answer);
    completions: the raw text as the prompt, continued as free text (no template)."""
    if endpoint == "chat":
        return "/v1/chat/completions", {"model": "merged", "max_tokens": max_tokens,
                                        "temperature": 0,
                                        "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {"model": "merged", "max_tokens": max_tokens, "temperature": 0,
                               "prompt": text}


def engine_probes(client: httpx.Client, url: str, endpoint: str, text: str, max_tokens: int,
                  verify: dict[str, object]) -> dict[str, float]:
    """The engine-side costs of one request (see the module docstring), in seconds."""
    from calibserve.calibration import verify_messages, verify_prompt
    from calibserve.routing.client_view import tier_body

    def timed(path: str, body: dict[str, object]) -> tuple[float, dict[str, object]]:
        started = time.perf_counter()
        r = client.post(url + path, json=body)
        elapsed = time.perf_counter() - started
        r.raise_for_status()
        return elapsed, r.json()

    path, body = request(endpoint, text, max_tokens)
    out: dict[str, float] = {}
    out["engine reply"], answer = timed(path, tier_body(endpoint, body, "merged", stream=False))
    choice = answer["choices"][0]  # type: ignore[index]
    verdict: dict[str, object] = {"model": "merged", "max_tokens": 1, "temperature": 0,
                                  "stream": False, **verify}
    # The token-id prompt equals vLLM's tokens of the text one (tests/server/test_integration.py
    # `test_verify_prompt_on_ids_is_the_text_prompts_tokens`), so /tokenize gives it here.
    if endpoint == "chat":
        reply = choice["message"]["content"] or ""
        messages = verify_messages(body["messages"], reply)  # type: ignore[arg-type]
        out["engine verify text"], _ = timed(path, {**verdict, "messages": messages})
        tokenize = {"messages": messages, "add_generation_prompt": True}
    else:
        prompt = verify_prompt(str(body["prompt"]), choice["text"])
        out["engine verify text"], _ = timed(path, {**verdict, "prompt": prompt})
        tokenize = {"prompt": prompt}
    ids = client.post(url + "/tokenize", json={"model": "merged", **tokenize}).json()
    by_ids = {k: v for k, v in verdict.items() if k not in ("logprobs", "top_logprobs")}
    by_ids["logprobs"] = verdict["top_logprobs"] if endpoint == "chat" else verdict["logprobs"]
    out["engine verify ids"], _ = timed("/v1/completions", {**by_ids, "prompt": ids["tokens"]})
    out["engine floor"], _ = timed("/v1/completions", {"model": "merged", "prompt": "a",
                                                      "max_tokens": 1, "temperature": 0})
    return out


def measure(client: httpx.Client, servers: dict[str, InProcessServer], engine_url: str,
            endpoint: str, texts: list[str], max_tokens: int, verify: dict[str, object]) -> None:
    lat: dict[str, list[float]] = {"mean": [], "verify": []}
    free_lat: dict[str, list[float]] = {"mean": [], "verify": []}
    probes: dict[str, list[float]] = {}
    verified = 0
    for warm in texts[:4]:  # warm both paths (and vLLM's caches) before measuring
        for server in servers.values():
            path, body = request(endpoint, warm, max_tokens)
            client.post(server.url + path, json=body)
    for text in texts:
        path, body = request(endpoint, text, max_tokens)
        methods: dict[str, str] = {}
        for method, server in servers.items():
            started = time.perf_counter()
            r = client.post(server.url + path, json=body)
            elapsed = time.perf_counter() - started
            r.raise_for_status()
            lat[method].append(elapsed)
            methods[method] = r.json()["choices"][0]["confidence"]["method"]
        if methods["mean"] != "answer":  # a free-form reply (the same greedy reply in both)
            for method in servers:
                free_lat[method].append(lat[method][-1])
            verified += methods["verify"] == "verify"
            for name, seconds in engine_probes(client, engine_url, endpoint, text, max_tokens,
                                               verify).items():
                probes.setdefault(name, []).append(seconds)
    for label, data in ((f"{endpoint}: all requests", lat),
                        (f"{endpoint}: free-form replies", free_lat)):
        if not data["mean"]:
            print(f"{label:32} {0:>4}")
            continue
        m50, v50 = statistics.median(data["mean"]), statistics.median(data["verify"])
        mavg, vavg = statistics.fmean(data["mean"]), statistics.fmean(data["verify"])
        m90, v90 = percentile(data["mean"], 0.9), percentile(data["verify"], 0.9)
        print(f"{label:32} {len(data['mean']):>4} {m50 * 1e3:>7.1f}ms {v50 * 1e3:>8.1f}ms "
              f"{v50 / m50:>6.2f} {mavg * 1e3:>7.1f}ms {vavg * 1e3:>8.1f}ms {vavg / mavg:>6.2f} "
              f"{v90 / m90:>9.2f}")
    print(f"{endpoint}: free-form replies that got a verify request: {len(free_lat['verify'])}; "
          f"with a yes/no verdict (method verify): {verified}")
    if probes:
        reply = statistics.median(probes["engine reply"])
        added = statistics.median(free_lat["verify"]) - statistics.median(free_lat["mean"])
        print(f"{endpoint}: where the time goes (free-form replies, p50; ratio to engine reply):")
        print(f"  {'calibserve verify - mean':28} {added * 1e3:7.1f}ms {added / reply:6.2f}")
        for name, values in probes.items():
            p50 = statistics.median(values)
            print(f"  {name:28} {p50 * 1e3:7.1f}ms {p50 / reply:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--model", type=Path, default=None,
                        help="serve this checkpoint instead of the merged demo model (the demo "
                        "world's prompts are still the requests)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--start-timeout", type=float, default=1500.0,
                        help="seconds to wait for vLLM (a shared 2-core machine is slow)")
    parser.add_argument("--vllm-placement", action="store_true",
                        help="vLLM's own CPU placement (a busy-polling worker process) instead "
                        "of the managed engine's default")
    parser.add_argument("--engine-args", default=f"--block-size {VERIFY_CPU_BLOCK_SIZE}",
                        help="vLLM arguments beyond the test engine's (default: the managed CPU "
                        "engine's block size; '--block-size 128' is vLLM's own on CPU)")
    args = parser.parse_args()
    if not args.vllm_placement:  # what `calibserve serve` runs (server/engine.py)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from calibserve.demo import build_world
    from calibserve.demo_pipeline import merge_demo
    from calibserve.fit.verdict import checkpoint_verdict_ids

    world = build_world()
    model_dir = args.model or merge_demo(world) / "model"
    ids = checkpoint_verdict_ids(model_dir)
    # What calibserve's verify request asks for: the verdict ids when the tokenizer has them
    # (the fit records them), else the top 20 (the demo's word-level tokenizer has no yes/no).
    verdict_params: dict[str, object] = (
        {"verdict_token_ids": ids} if ids["yes"] and ids["no"] else {})
    all_ids = [*ids["yes"], *ids["no"]]
    tmp = Path(tempfile.mkdtemp(prefix="freeform-latency-"))
    vllm_process.START_TIMEOUT_S = max(vllm_process.START_TIMEOUT_S, args.start_timeout)
    engine = VLLMProcess(model_dir, "merged", tmp, extra_args=tuple(args.engine_args.split()))
    engine.start()
    servers: dict[str, InProcessServer] = {}
    try:
        engine.wait_ready()
        for method in ("mean", "verify"):
            cal = document(model_dir, method, tmp / f"calibration-{method}.json",
                           verdict_params)
            settings = ServerSettings.model_validate({
                "signing_key": "bench", "models": [{
                    "name": "merged", "upstreams": [engine.url], "upstream_model": "merged",
                    "calibration": str(cal)}]})
            servers[method] = InProcessServer(settings)
        texts = prompts(world / "data", args.requests)
        print(f"machine: {machine()} (shared); date {utc_now()}")
        print(f"requests: {len(texts)} per endpoint, sequential, max_tokens {args.max_tokens}, "
              f"temperature 0; load average {loadavg()[0]:.2f}; engine placement: "
              + ("vLLM's own" if args.vllm_placement else
                 f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']}")
              + f"; engine args: {args.engine_args or 'none'}")
        print(f"{'':32} {'n':>4} {'p50 mean':>9} {'p50 verify':>10} {'ratio':>6} "
              f"{'avg mean':>9} {'avg verify':>10} {'ratio':>6} {'p90 ratio':>9}")
        print(f"model: {model_dir}; verdict: "
              + (f"{len(all_ids)} yes/no token ids (logprob_token_ids)" if verdict_params
                 else "top 20 logprobs (the tokenizer has no yes/no token)"))
        with httpx.Client(timeout=120) as client:
            for endpoint in ("chat", "completions"):
                verify: dict[str, object] = (
                    {"logprob_token_ids": all_ids} if verdict_params else {})
                if endpoint == "chat":
                    verify = {"logprobs": True, "top_logprobs": 1 if verdict_params else 20,
                              **verify}
                else:
                    verify = {"logprobs": 1 if verdict_params else 20, **verify}
                measure(client, servers, engine.url, endpoint, texts, args.max_tokens, verify)
        stats = httpx.get(f"{servers['verify'].url}/metrics").text
        for line in stats.splitlines():
            if line.startswith("calibserve_confidence_requests_total{"):
                print(line)
        for line in httpx.get(f"{engine.url}/metrics").text.splitlines():
            if line.startswith(("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")):
                print(line)
        print(f"load average at the end: {loadavg()[0]:.2f}")
    finally:
        for server in servers.values():
            server.stop()
        engine.stop()


if __name__ == "__main__":
    main()
