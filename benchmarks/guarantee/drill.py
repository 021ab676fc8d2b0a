"""Live drill of a certified threshold: the map breaks under calibserve; the live bound crosses
max_error, the alert fires in a real Prometheus, re-certification restores the promise.

The demo's merged model is certified at fit time (`calibrate_checkpoint(..., --max-error 0.2)`,
the option-letter method on the calibrate split) and served by a managed REAL vLLM CPU engine
with `threshold: guaranteed`, probes at `--rate` a minute (the merge's held-out probe split) and
a real Prometheus scraping every 5 s with the production rules. The fault is there from the
first probe: the document's map is replaced by a sharpening temperature (T = 0.3, as
`benchmarks.drift_drill.sharpened_calibration`: a deploy that shipped a broken map), so answers
the certificate would have escalated clear the served threshold. Recalibration runs in `shadow`
until `CalibserveGuaranteeBroken` fires, then `on`: the next refit swaps the map and
re-certifies the threshold on the window.

Measured: when the live bound first exceeds max_error (with 100 kept answers); when the alert
fires (from the first probe); the re-certified threshold; the realised error of the kept probes
before and after re-certification (judged by the threshold served when each probe was answered).

    flock /work/heavy.lock python -m benchmarks.guarantee.drill [--rate 240]

Writes benchmarks/guarantee/drill.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import stamp, write_json
from benchmarks.drift_drill import Prometheus, sharpened_calibration
from benchmarks.reliability.harness import InProcessServer

HERE = Path(__file__).resolve().parent
NAME = "calibserve-demo"
ALERTS = ("CalibserveGuaranteeUnverified", "CalibserveGuaranteeBroken")
DELTA = 0.1


def firing(prom: Prometheus) -> set[str]:
    """The guarantee alerts firing now."""
    try:
        alerts = httpx.get(f"{prom.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except (httpx.HTTPError, KeyError, ValueError):
        return set()
    return {a["labels"].get("alertname") for a in alerts
            if a["labels"].get("alertname") in ALERTS and a["state"] == "firing"}


def certified_document(model: Path, data: Path, alpha: float) -> Path:
    from calibserve.calibration.certified import GuaranteeTargets
    from calibserve.fit.multiple_choice import calibrate_checkpoint

    out = Path(tempfile.mkdtemp(prefix="guarantee-drill-")) / "calibration.json"
    calibrate_checkpoint(model, data, out, guarantees=GuaranteeTargets((alpha,), DELTA))
    return out


def kept_error(events: list[dict[str, Any]]) -> dict[str, float | int | None]:
    kept = [e for e in events if e["score"] >= e["threshold"]]
    wrong = sum(not e["correct"] for e in kept)
    return {"probes": len(events), "kept": len(kept),
            "kept_error": wrong / len(kept) if kept else None}


def run(model: Path, calibration: Path, probes: Path, rate: float, after: int,
        timeout_s: float, alpha: float) -> dict[str, Any]:
    from calibserve.server.config import ServerSettings

    settings = ServerSettings.model_validate({
        "signing_key": "drill", "host": "127.0.0.1", "probe_rate": rate, "log_level": "warning",
        "recalibrate": "shadow",
        "recalibration_dir": tempfile.mkdtemp(prefix="guarantee-drill-store-"),
        "models": [{"name": NAME, "model": str(model), "engine": {"max_model_len": 256},
                    "calibration": str(calibration), "probe_data": str(probes),
                    "threshold": "guaranteed", "max_error": alpha,
                    # Never asked: probes do not pass the router; a threshold needs two tiers.
                    "escalate_to": [{"name": "expert", "upstreams": ["http://127.0.0.1:9"]}]}]})
    out: dict[str, Any] = {"rate_per_min": rate, "max_error": alpha, "delta": DELTA}
    started = time.monotonic()
    srv = InProcessServer(settings)
    prom = None
    try:
        rt = srv.runtime
        out["engine_start_s"] = round(time.monotonic() - started, 1)
        model_rt = rt.models[NAME]
        live = rt.live_guarantees[NAME]
        recal = rt.recalibrators[NAME]
        [runner] = rt.probes
        out["certified_threshold"] = model_rt.route.policy.threshold_for("answer")
        events: list[dict[str, Any]] = []
        chained = runner.on_outcome

        def on_outcome(method: str, raw: float, correct: bool) -> None:
            if method == "answer":
                events.append({"t": time.monotonic(), "raw": raw, "correct": correct,
                               "score": model_rt.primary.tier.scorer.calibrate(raw),
                               "threshold": model_rt.route.policy.threshold_for("answer"),
                               "version": recal.version})
            if chained is not None:
                chained(method, raw, correct)

        runner.on_outcome = on_outcome
        prom = Prometheus(srv.url.removeprefix("http://"),
                          Path(tempfile.mkdtemp(prefix="guarantee-drill-prom-")))
        t0 = time.monotonic()
        crossed_at = recert_at = None
        alert_at: dict[str, float] = {}
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = round(time.monotonic() - t0, 1)
            window = live.windows.get("answer")
            if crossed_at is None and window is not None and window.kept >= 100 \
                    and window.bound > alpha:
                crossed_at = now
                out["bound_at_crossing"] = window.bound
                out["lower_bound_at_crossing"] = window.lower_bound
                out["kept_at_crossing"] = (window.kept, window.kept_errors)
                print(f"{now:6.1f} s live bound {window.bound:.3f} > {alpha} (lower "
                      f"{window.lower_bound:.3f}; {window.kept_errors} of {window.kept} kept "
                      "wrong)", flush=True)
            for name in firing(prom) - set(alert_at):
                alert_at[name] = now
                print(f"{now:6.1f} s {name} firing", flush=True)
            if recal.mode != "on" and ALERTS[1] in alert_at:
                print(f"{now:6.1f} s recalibration on", flush=True)
                recal.mode = "on"
            if recert_at is None and recal.version > 0 and \
                    model_rt.route.policy.threshold_for("answer") != out["certified_threshold"]:
                recert_at = now
                print(f"{now:6.1f} s re-certified: threshold "
                      f"{model_rt.route.policy.threshold_for('answer'):.4f} (version "
                      f"{recal.version})", flush=True)
            if recert_at is not None and \
                    sum(e["version"] == recal.version for e in events) >= after:
                break
        out["bound_crossed_s"] = crossed_at
        out["alerts_fired_s"] = alert_at
        out["recertified_s"] = recert_at
        out["threshold_after"] = model_rt.route.policy.threshold_for("answer")
        out["before"] = kept_error([e for e in events if e["version"] == 0])
        if recal.version > 0:
            out["after"] = kept_error([e for e in events if e["version"] == recal.version])
            out["after"]["version"] = recal.version
        window = live.windows.get("answer")
        if window is not None:
            out["live_bound_at_end"] = window.bound
            out["live_lower_bound_at_end"] = window.lower_bound
            out["live_kept_at_end"] = (window.kept, window.kept_errors)
        out["refits"] = {k: v for k, v in (model_rt.primary.calibration.metrics
                                           .get("recalibration") or {}).items()}
    finally:
        if prom is not None:
            prom.stop()
        srv.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=240.0, help="probes per minute")
    parser.add_argument("--after", type=int, default=300,
                        help="probes to judge under the re-certified threshold")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--max-error", type=float, default=0.1,
                        help="the certified target (0.1: at 0.2 the broken map still keeps "
                        "answers wrong under 0.2 of the time on the demo, RESULTS.md)")
    parser.add_argument("--world", type=Path, default=None,
                        help="a built demo world (.calibserve/demo/DIGEST) with a merge beside "
                        "it; default: build (or reuse) the current settings' world and merge")
    args = parser.parse_args(argv)
    if args.world is not None:
        world = args.world
        merges = sorted(world.parent.glob(f"merged-{world.name}-*/model"))
        if not merges:
            raise SystemExit(f"no merge of {world} beside it")
        merged = merges[-1]
    else:
        from calibserve.demo import build_world
        from calibserve.demo_pipeline import merge_demo

        world = build_world(seed=0)
        merged = merge_demo(world) / "model"
    certified = certified_document(merged, world / "data", args.max_error)
    broken = sharpened_calibration(certified)
    result = run(merged, broken, merged / "probes.jsonl", args.rate, args.after, args.timeout,
                 args.max_error)
    result.update(world=world.name, **stamp())
    write_json(HERE / "drill.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
