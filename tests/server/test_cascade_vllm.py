"""A route of three real vLLM CPU engines, asked through the official openai SDK.

Primary: the merged demo model (its calibration.json); middle: the demo's aligned model; last:
the demo's expert, each with its own calibration document (fitted here on the calibrate split,
scored with transformers). Served with `--threshold auto`, every tier but the last is judged by
its own document's threshold, on the confidence the engine's logprobs give. What could fail: a
served confidence that is not the one the document was fitted on, a tier judged by another
tier's threshold, a middle tier's judgment missing, a probe that does not walk on to the middle
tier when the primary escalates it (or walks on to the last tier).

`--threshold guaranteed` cannot serve this route: `calibserve certify` certifies no threshold
for the middle tier (the aligned model is mostly wrong on the hard items the merged model leaves
it, and the expert in its place has errors among its most confident answers there, which end a
single fixed-sequence scan at once), and the server refuses such a route at start, naming the tier.
That is checked here too, on the real certificates. With `certify --starts 3` the expert, as the
middle tier (the aligned model last), is certified, and that route is served as guaranteed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from calibserve.calibration import CalibrationDocument
from calibserve.calibration.mc_prompt import format_mc_prompt
from calibserve.fit.multiple_choice import calibrate_checkpoint
from calibserve.merge.certify_route import RouteTier, _served_confidence
from calibserve.server.config import ServerSettings
from calibserve.server.runtime import ServerRuntime
from calibserve.testing.checks import sample, total
from tests.server.conftest import serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N = 40  # held-out items asked (about 5 s on the CPU engines)
TARGET = 0.7  # --target-accuracy: every tier's document has a threshold for it
CLOSE = 2e-3  # served vs certify-time confidence (vLLM vs transformers, same top 5)
MAX_ERROR = 0.3  # a route of three certified on this demo (with several starts)


def test_a_three_tier_route_on_real_engines_is_judged_tier_by_tier(
        merged_dir: Path, demo_dir: Path, vllm_server: Callable[[Path, str], str],
        tmp_path: Path) -> None:
    from calibserve.cli import app

    data = demo_dir / "data"
    tiers = {"merged": merged_dir / "model", "aligned": demo_dir / "aligned",
             "expert": demo_dir / "expert"}
    files = {name: tmp_path / f"{name}.json" for name in tiers}
    shutil.copy(tiers["merged"] / "calibration.json", files["merged"])
    for name in ("aligned", "expert"):
        calibrate_checkpoint(tiers[name], data, files[name], "platt")
    thresholds = {}
    for role, name in (("primary", "merged"), ("middle", "aligned")):
        (fit,) = [t for t in CalibrationDocument.load(files[name]).method("answer").thresholds
                  if t.target_accuracy == TARGET]
        assert fit.threshold is not None
        thresholds[role] = fit.threshold

    items = _items(data)
    scored = {role: _served_confidence(RouteTier(tiers[name], files[name]), items)[0]
              for role, name in (("primary", "merged"), ("middle", "aligned"))}
    urls = {name: vllm_server(path, name) for name, path in tiers.items()}
    model: dict[str, Any] = {
        "name": "r", "upstreams": [urls["merged"]], "upstream_model": "merged",
        "calibration": str(files["merged"]), "probe_data": str(data / "test.jsonl"),
        "threshold": "auto", "target_accuracy": TARGET,
        "escalate_to": [
            {"name": "mid", "upstreams": [urls["aligned"]], "upstream_model": "aligned",
             "calibration": str(files["aligned"])},
            {"name": "expert", "upstreams": [urls["expert"]], "upstream_model": "expert",
             "calibration": str(files["expert"])}]}
    settings = ServerSettings.model_validate({"signing_key": "cascade", "probe_rate": 1,
                                              "models": [model]})
    gaps: dict[str, list[float]] = {"primary": [], "middle": []}
    with serve(settings) as running:
        [runner] = running.runtime.probes
        running.call(runner.stop())  # driven one probe at a time below
        served_by = _ask_all(running.url, items, scored, thresholds, gaps)
        # Probes walk the route as these requests did: on to the middle tier exactly when the
        # primary would escalate, never to the last tier. (The runner sent its first probe on
        # start, before it was stopped: counted from here on.)
        before = httpx.get(f"{running.url}/metrics", timeout=10).text
        for probe in runner.probes.probes[:N]:
            running.call(runner.ask(probe))
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
    escalated = sum(served != "r" for served in served_by)  # the primary sent it on

    def probes_ok(label: str) -> float:
        return (sample(text, "calibserve_probes_total", model=label, outcome="ok")
                - sample(before, "calibserve_probes_total", model=label, outcome="ok"))

    assert probes_ok("r") == N and probes_ok("r:mid") == escalated
    assert total(text, "calibserve_probes_total", model="r:expert") == 0
    # Every way through the route was taken by some of the N items.
    assert {"mid", "expert"} <= set(served_by) and 0 < escalated < N
    # The served confidence is the one the thresholds were set on: certify-time scoring reads
    # the option letters as the server does (the first token's top 5 alternatives).
    for name, gap in gaps.items():
        assert gap and max(gap) < CLOSE, (name, sorted(gap))

    # The same route under `guaranteed`: certify finds no threshold for the middle tier, says
    # so, and the server refuses the route at start, naming that tier.
    args = ["certify", "--data", str(data), "--max-error", "0.3"]
    for name in tiers:
        args += ["--tier", str(tiers[name]), "--calibration", str(files[name])]
    certified = CliRunner().invoke(app, args)
    assert certified.exit_code == 0, certified.output
    assert "tier 1 (aligned): nothing certified" in certified.output
    assert "the route cannot be served with --threshold guaranteed" in certified.output
    guaranteed = {**model, "threshold": "guaranteed", "max_error": 0.3}
    guaranteed.pop("target_accuracy")
    with pytest.raises(ValueError, match="tier 'mid'"):
        ServerRuntime(ServerSettings.model_validate({"signing_key": "k",
                                                     "models": [guaranteed]}))


def _items(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()][:N]


def _ask_all(url: str, items: list[dict[str, Any]], scored: dict[str, Any],
             thresholds: dict[str, float], gaps: dict[str, list[float]], last: str = "expert"
             ) -> list[str]:
    """Ask route `r` every item through the openai SDK, each reply's walk checked
    (`_check_walk`); the tier that served each."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    served_by = []
    for i, item in enumerate(items):
        resp = client.chat.completions.create(
            model="r", messages=[{"role": "user", "content": format_mc_prompt(item)}],
            temperature=0, max_tokens=1)
        info: dict[str, Any] = resp.model_extra["calibserve"]  # type: ignore[index]
        served_by.append(info["served_by"])
        _check_walk(info, i, scored, thresholds, gaps, last)
    return served_by


def _check_walk(info: dict[str, Any], i: int, scored: dict[str, Any],
                thresholds: dict[str, float], gaps: dict[str, list[float]],
                last: str = "expert") -> None:
    """One reply's judgments: each tier judged by its own threshold on its served confidence,
    served by the tier the judgments lead to; how far each served confidence is from the one
    the document was fitted on goes into `gaps`."""
    first, *rest = info["judgments"]
    assert first["threshold"] == thresholds["primary"]
    assert first["escalate"] is (first["confidence"] < thresholds["primary"])
    gaps["primary"].append(abs(first["confidence"] - scored["primary"][i]))
    if not first["escalate"]:
        assert rest == [] and not info["escalated"]
        return
    (middle,) = rest
    assert middle["tier"] == "mid" and middle["threshold"] == thresholds["middle"]
    assert middle["escalate"] is (middle["confidence"] < thresholds["middle"])
    gaps["middle"].append(abs(middle["confidence"] - scored["middle"][i]))
    assert info["escalated"] and info["served_by"] == (last if middle["escalate"] else "mid")


def test_a_route_certified_with_several_starts_is_served_as_guaranteed(
        merged_dir: Path, demo_dir: Path, vllm_server: Callable[[Path, str], str],
        tmp_path: Path) -> None:
    """With one start no middle tier of this demo certifies at 0.3; with `--starts 3` the
    expert does (as the middle tier, the aligned model last), and the route is served with
    `--threshold guaranteed`: each judged tier by the threshold certified for it."""
    from calibserve.cli import app

    data = demo_dir / "data"
    tiers = {"merged": merged_dir / "model", "expert": demo_dir / "expert",
             "aligned": demo_dir / "aligned"}  # the route's order
    files = {name: tmp_path / f"{name}.json" for name in tiers}
    shutil.copy(tiers["merged"] / "calibration.json", files["merged"])
    for name in ("aligned", "expert"):
        calibrate_checkpoint(tiers[name], data, files[name], "platt")
    args = ["certify", "--data", str(data), "--max-error", str(MAX_ERROR), "--starts", "3"]
    for name in tiers:
        args += ["--tier", str(tiers[name]), "--calibration", str(files[name])]
    certified = CliRunner().invoke(app, args)
    assert certified.exit_code == 0, certified.output
    assert "tier 1 (expert): threshold" in certified.output
    thresholds = {}
    for role, name in (("primary", "merged"), ("middle", "expert")):
        cert = CalibrationDocument.load(files[name]).method("answer").guarantee_for(MAX_ERROR)
        assert cert is not None and cert.starts == 3 and cert.tier == ["merged", "expert"
                                                                      ].index(name)
        thresholds[role] = cert.threshold

    items = _items(data)
    scored = {role: _served_confidence(RouteTier(tiers[name], files[name]), items)[0]
              for role, name in (("primary", "merged"), ("middle", "expert"))}
    urls = {name: vllm_server(path, name) for name, path in tiers.items()}
    settings = ServerSettings.model_validate({"signing_key": "cascade", "models": [{
        "name": "r", "upstreams": [urls["merged"]], "upstream_model": "merged",
        "calibration": str(files["merged"]), "threshold": "guaranteed", "max_error": MAX_ERROR,
        "escalate_to": [
            {"name": "mid", "upstreams": [urls["expert"]], "upstream_model": "expert",
             "calibration": str(files["expert"])},
            {"name": "last", "upstreams": [urls["aligned"]], "upstream_model": "aligned",
             "calibration": str(files["aligned"])}]}]})
    gaps: dict[str, list[float]] = {"primary": [], "middle": []}
    with serve(settings) as running:
        served_by = _ask_all(running.url, items, scored, thresholds, gaps, last="last")
        text = httpx.get(f"{running.url}/metrics", timeout=10).text
    assert "mid" in served_by and "r" in served_by
    for label in ("r", "r:mid"):  # both judged tiers watched live by their own certificate
        assert sample(text, "calibserve_guarantee_max_error", model=label,
                      method="answer") == MAX_ERROR
    for name, gap in gaps.items():  # certified on the confidence that is served
        assert gap and max(gap) < CLOSE, (name, sorted(gap))
