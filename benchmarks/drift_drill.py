"""Fault drill: the engine changes under calibserve; probes see it, the alert fires, recalibration
fixes it.

The fault: calibserve serves the demo's ALIGNED checkpoint (overconfident after alignment) under
the MERGED model's calibration.json, as a deploy that shipped the wrong weights behind the right
name would. A managed REAL vLLM CPU engine, probes at `--rate` a minute (the merge's held-out probe
split), recalibration first in `shadow`, then switched to `on` once shadow reports a better
candidate. With `--prometheus` a real Prometheus scrapes calibserve every 5 s with the production
rules (deploy/prometheus/rules.yml, groups evaluated every minute) and the drill times
`CalibserveProbeCalibrationDrift` from the first probe to firing.

A second fault, whose size does not depend on the demo world's build (`sharpened_calibration`,
what the CI test uses): the MERGED model under its own calibration.json with the served method's
map replaced by a sharpening temperature (T = 0.3), as a deploy that shipped a broken map would.
The first fault's size varies with the build: the aligned model and the merge can sit close
together (on one AMD EPYC build, AVX-512, the merge picked lambda 0.5 and the aligned model's
probe ECE under its map, 0.069, was below the map's own fit ECE, 0.105: no drift to see).

Measured: the probe ECE before the swap; when the alert fires; shadow's candidate vs served ECE;
the swap; the live ECE of the probes answered after the swap under the swapped map, against the
alert level (fit ECE + 0.05) and against a calibrator fitted OFFLINE on that engine
(`calibrate_checkpoint` on the aligned model's calibrate split, the same temperature family)
applied to the same probes; and that a client's answer keeps its shape across the swap.

    flock /work/heavy.lock python -m benchmarks.drift_drill [--rate 240] [--prometheus]

Writes benchmarks/results/drift_drill.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.common import free_port, stamp, write_json
from benchmarks.reliability.harness import InProcessServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "drift_drill.json"
NAME = "calibserve-demo"
ALERT = "CalibserveProbeCalibrationDrift"


def shape(value: Any) -> Any:
    """The JSON structure without the values (keys and types), to compare answers' shapes."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items()) if k not in ("logprobs",)}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def _ece(conf: list[float], correct: list[bool]) -> float:
    from calibserve.calibration import ece

    return float(ece(np.asarray(conf), np.asarray(correct, np.float64)))


class Prometheus:
    """A real Prometheus scraping calibserve with the production rules."""

    def __init__(self, target: str, work: Path) -> None:
        config = {"global": {"scrape_interval": "5s", "evaluation_interval": "1m"},
                  "rule_files": [str(REPO / "deploy" / "prometheus" / "rules.yml")],
                  "scrape_configs": [{"job_name": "calibserve",
                                      "static_configs": [{"targets": [target]}]}]}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (work / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def firing(self) -> bool:
        try:
            alerts = httpx.get(f"{self.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        except (httpx.HTTPError, KeyError, ValueError):
            return False
        return any(a["labels"].get("alertname") == ALERT and a["state"] == "firing"
                   for a in alerts)

    def value(self, expr: str) -> float | None:
        try:
            result = httpx.get(f"{self.url}/api/v1/query", params={"query": expr},
                               timeout=5).json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def offline_map(aligned: Path, data: Path) -> Any:
    """The temperature calibrator fitted offline on the aligned engine's calibrate split."""
    from calibserve.fit.multiple_choice import calibrate_checkpoint

    out = Path(tempfile.mkdtemp(prefix="drill-offline-")) / "calibration.json"
    doc = calibrate_checkpoint(aligned, data, out, "temperature")
    return doc.method("answer").calibration_map()


def sharpened_calibration(calibration: Path, temperature: float = 0.3) -> Path:
    """A copy of `calibration` (in a new temp folder) whose multiple-choice method's map is
    `sigmoid(logit(p) / temperature)`: overconfident for any model, its recorded fit ECE kept."""
    from calibserve.calibration import CalibrationDocument, TemperatureScaling

    doc = CalibrationDocument.load(calibration)
    name = doc.multiple_choice
    broken = doc.methods[name].model_copy(
        update={"calibrator": TemperatureScaling(temperature).to_dict()})
    out = Path(tempfile.mkdtemp(prefix="drill-broken-map-")) / "calibration.json"
    doc.model_copy(update={"methods": {**doc.methods, name: broken}}).write(out)
    return out


def run_drill(model_dir: Path, calibration: Path, probes: Path, *, rate: float,
              after_swap: int = 300, timeout_s: float = 900.0, prometheus: bool = False,
              upstream: str | None = None, upstream_model: str = NAME,
              log: Callable[[str], None] = print,
              recal_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The drill on one engine; `upstream`: a vLLM already serving `model_dir` (as `NAME`)."""
    from calibserve.server.config import ServerSettings
    from calibserve.server.recalibration import Recalibrator

    entry: dict[str, Any] = {"name": NAME, "calibration": str(calibration),
                             "probe_data": str(probes)}
    if upstream is None:
        entry.update(model=str(model_dir), engine={"max_model_len": 256})
    else:
        entry.update(upstreams=[upstream], upstream_model=upstream_model)
    settings = ServerSettings.model_validate({
        "signing_key": "drill", "host": "127.0.0.1", "probe_rate": rate, "log_level": "warning",
        "recalibrate": "shadow", "models": [entry]})
    store = Path(tempfile.mkdtemp(prefix="drill-store-"))
    out: dict[str, Any] = {"rate_per_min": rate}
    started = time.monotonic()
    srv = InProcessServer(settings)
    prom = None
    try:
        rt = srv.runtime
        out["engine_start_s"] = time.monotonic() - started
        [runner] = rt.probes
        old = rt.recalibrators[NAME]
        # The drill's own recalibrator (same code), so its window sizes can be set.
        recal = Recalibrator(rt.models[NAME], "shadow", store, old.metrics,
                             **(recal_kwargs or {}))
        recal.on_swap = old.on_swap  # the fit-time gauges follow the swap
        doc = rt.models[NAME].primary.calibration
        held_out = (doc.metrics.get("test") or {}).get("ece", 0.0)
        fit_ece = max(doc.method("answer").fit.ece_calibrated, float(held_out))  # as the rules
        events: list[tuple[float, int, float, float, bool]] = []  # t, version, raw, score, y

        def on_outcome(method: str, raw: float, correct: bool) -> None:
            if method == "answer":
                score = rt.models[NAME].primary.tier.scorer.calibrate(raw)
                events.append((time.monotonic(), recal.version, raw, score, correct))
            recal.observe(method, raw, correct)

        runner.on_outcome = on_outcome
        if prometheus:
            prom = Prometheus(srv.url.removeprefix("http://"),
                              Path(tempfile.mkdtemp(prefix="drill-prom-")))
        client = httpx.Client(base_url=srv.url, timeout=30)
        body = {"model": NAME, "max_tokens": 1, "temperature": 0, "messages": [
            {"role": "user", "content": runner.probes.probes[0].content}]}
        before_shape = shape(client.post("/v1/chat/completions", json=body).json())
        t0 = time.monotonic()
        shadow_at = swap_at = alert_at = None
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = time.monotonic() - t0
            last = recal.last.get("answer")
            if shadow_at is None and last is not None and last.better:
                shadow_at = now
                out["shadow"] = {"at_s": now, "current_ece": last.current_ece,
                                 "candidate_ece": last.candidate_ece,
                                 "brier_gain_z": last.brier_gain_z}
                log(f"{now:5.0f} s shadow: candidate ECE {last.candidate_ece:.3f} vs served "
                    f"{last.current_ece:.3f}; switching to on")
                recal.mode = "on"
            if swap_at is None and recal.version > 0:
                swap_at = now
                log(f"{now:5.0f} s swapped in calibrator version {recal.version}")
            if prom is not None and alert_at is None and prom.firing():
                alert_at = now
                log(f"{now:5.0f} s {ALERT} firing")
            post = [e for e in events if e[1] > 0]
            if swap_at is not None and len(post) >= after_swap and (
                    prom is None or alert_at is not None):
                break
        pre = [e for e in events if e[1] == 0]
        post = [e for e in events if e[1] > 0][:after_swap]
        out["probes_before_swap"] = len(pre)
        out["probe_ece_before_swap"] = _ece([e[3] for e in pre], [e[4] for e in pre])
        out["fit_ece"] = fit_ece
        out["alert_level_before"] = fit_ece + 0.05
        out["alert_fired_s"] = alert_at
        out["swap_s"] = swap_at
        if post:
            new_fit = rt.models[NAME].primary.calibration.method("answer").fit
            out["probes_after_swap"] = len(post)
            out["live_ece_after_swap"] = _ece([e[3] for e in post], [e[4] for e in post])
            out["alert_level_after"] = new_fit.ece_calibrated + 0.05
            out["raws_after_swap"] = [e[2] for e in post]
            out["correct_after_swap"] = [bool(e[4]) for e in post]
        after_shape = shape(client.post("/v1/chat/completions", json=body).json())
        out["api_shape_unchanged"] = before_shape == after_shape
        if prom is not None:
            out["prometheus_probe_ece_10m_at_end"] = prom.value(
                "model:calibserve_probe_ece:10m")
        out["recalibrated_by"] = "probes"
    finally:
        if prom is not None:
            prom.stop()
        srv.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=240.0, help="probes per minute")
    parser.add_argument("--prometheus", action="store_true", help="time the real alert")
    parser.add_argument("--after-swap", type=int, default=300)
    args = parser.parse_args(argv)
    from calibserve.calibration import ece
    from calibserve.demo import build_world
    from calibserve.demo_pipeline import merge_demo

    world = build_world(seed=0)
    merged = merge_demo(world) / "model"
    result = run_drill(world / "aligned", merged / "calibration.json", merged / "probes.jsonl",
                       rate=args.rate, after_swap=args.after_swap, prometheus=args.prometheus)
    if "raws_after_swap" in result:
        offline = offline_map(world / "aligned", world / "data")
        raws = np.asarray(result.pop("raws_after_swap"))
        correct = np.asarray(result.pop("correct_after_swap"), np.float64)
        result["offline_ece_same_probes"] = float(ece(np.clip(offline.apply(raws), 0, 1),
                                                      correct))
        result["gap_to_offline"] = result["live_ece_after_swap"] - \
            result["offline_ece_same_probes"]
    result.update(stamp())
    write_json(RESULTS, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
