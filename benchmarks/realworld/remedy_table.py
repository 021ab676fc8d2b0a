"""The remedies side by side (issue 26 item 5): every final model of the real pair, served by
`calibserve serve`, asked the same held-out questions through the openai SDK, in one table.

    .venv/bin/python -m benchmarks.realworld.remedy_table                   # every row, resumable
    .venv/bin/python -m benchmarks.realworld.remedy_table --rows base,merge --limit 50
    .venv/bin/python -m benchmarks.realworld.remedy_table --report-only     # no engine started

Rows (names for `--rows`; paths under `$CALIBSERVE_HOME/realworld`, the layout
`gemma_pair.sh` builds; `--config FILE` changes any of them):

| row | model | calibration |
|---|---|---|
| base | models/gemma-3-270m | none |
| base-completion | models/gemma-3-270m, asked by /v1/completions | none |
| aligned | models/gemma-3-270m-instruct | none |
| aligned-calibrated | models/gemma-3-270m-instruct | calibrated/NAME/calibration.json (fitted) |
| merge | gemma-merge/model | none (its calibration.json is not served) |
| merge-calibrated | gemma-merge/model | gemma-merge/model/calibration.json |
| cft | models/gemma-3-270m-cft | none |
| rcft | models/gemma-3-270m-rcft | none |
| sft2 | models/gemma-3-270m-sft2 (seed 004's control: one more plain SFT epoch) | none |
| label-free | models/gemma-3-270m-instruct | label-free/calibration.json (issue 27 item 2) |

A row whose model (or calibration) does not exist is listed as "not built" with the command that
builds it, and the run goes on with the rest.

What each row is asked, and how it is scored
--------------------------------------------
- Items: the world facts' short-answer test split (`--data DIR/short_test.jsonl`, 819 items),
  the first `--limit` of them (the file is a seeded shuffle). No row was trained, merged or
  calibrated on them.
- Prompt: the item's `question`, verbatim, as the one user message. That is how `calibserve tune`
  renders a short-answer training item (tune/data.py) and how `calibserve merge` scores short
  answers at every lambda (merge/freeform.py), so every row is asked what its training and
  selection asked. The exception is `base-completion`: a base model was never taught to answer
  a chat turn (under the chat template it repeats the question), so it is also asked as a
  plain-text completion, `Question: {question}\nAnswer:`, read to the first newline, through
  `/v1/completions` (what a user of a base model does; the merge's sweep asks every lambda in
  chat form, so the `base` row is the sweep's lambda = 0). (serve_eval.py appends "Answer in a
  few words." for SmolLM2, which was tuned on other data.) Greedy (temperature 0),
  `--max-tokens` 16, no logprobs asked: the client reads
  `choices[0].confidence = {score, raw, method, calibrated}` as any user would.
- Grade: `calibration.grading.contains_answer` (`contains`: the gold or an alias as a whole-word
  run of the reply's first line), the grader the merge and the calibrate step use.
- Metrics of the served `score` (what a client is told): accuracy, ECE (15 equal-width bins),
  Brier, AUROC of right vs wrong, log loss (binary, clipped at 1e-12), mean confidence, the share
  of replies served `calibrated: true`, the serving methods; the raw score's ECE and AUROC too
  (results.json).

How rows are served
-------------------
One vLLM engine per distinct checkpoint, started with the managed engine's command line
(`server.engine.build_command`, CPU defaults, `--enforce-eager`), and one `calibserve serve
--config` in front of it with one model per row (`upstreams:` that engine, each row with its own
`calibration:` or none): rows that share a checkpoint (aligned, aligned-calibrated, label-free;
merge, merge-calibrated) share an engine, and the aligned calibrator is fitted against that same
engine (`calibserve calibrate --upstream`). A row with no calibration is served with none, not
with the checkpoint's own calibration.json (calibserve serve's default for a managed model), so
`merge` is the merged weights as they are.

The base checkpoint has no chat template, and vLLM refuses a chat request without one. It is
served with the template `calibserve tune` trained the aligned model with (tune/templates.py's
built-in `gemma`, which `--chat-template gemma` wrote into the aligned checkpoint), passed to the
engine as `--chat-template FILE`: the rendering the merge's sweep used for lambda = 0 (it renders
every point with the aligned tokenizer's template). A user serving a template-less base does the
same through `engine.extra_args`. A row's `chat_template` (a built-in name or a file) is used
only for a checkpoint without a template of its own.

The aligned calibrator is `calibserve calibrate --calibrator auto --grader
calibserve.calibration.grading:contains_answer` on a data directory holding the world facts'
`calibrate.jsonl` (the option-letter fit that `calibrate` always makes) and
`short_calibrate.jsonl` (the free-form fit, through the serving path); the test splits are left
out, so the calibrate step never sees the table's items (and does not pay for reporting on them).

What a row cost
---------------
- built: what produced the row, in minutes, each part named with its source: `calibserve tune`
  runs from their `train_info.json` (`time.cpu_minutes`, the trainer's CPU over every session);
  the merge from the cost record `gemma_pair.sh` writes beside its output (`gemma-merge.cost.json`,
  `benchmarks.realworld.cost`: CPU of the merge and everything it started) or, when there is
  none, its `report.json` timings (load + sweep + write: wall seconds, the free-form fit after
  the write not included; marked "wall"); the calibrate step as measured here (CPU of the
  `calibserve calibrate` process tree and of the engine it drove, `calibration.cost.json` beside
  the calibration). A derived model includes its parents' cost (the aligned tune for the merge,
  CFT, RCFT and the calibrated aligned).
- eval: the CPU of serving the row's items here (engine, calibserve and this client), summed over
  resumed sessions. Engine and proxy start-up is recorded apart (`engine_starts` in
  results.json; it is shared by the rows of one engine).

Outputs (in `--out`, default `$CALIBSERVE_HOME/realworld/remedy-table`), each written atomically:
`results.json` (every row's metrics, costs, status; the machine, date, load average, versions),
`report.md` (the table), `reliability.png` (one panel per row: the served score's reliability
diagram, and the raw score's where it differs). Answers are appended to `rows/ROW/answers.jsonl`
as they arrive; a rerun asks only what is missing, and an answer file made with another
checkpoint, calibration or template (`rows/ROW/served.json` records them) is set aside
(`stale-answers.jsonl`) and asked again. The numbers and pages are made by `remedy_report`; a
row's fit and eval costs are measured by `cost` (CPU of this process tree, engines included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.realworld import cost
from benchmarks.realworld.remedy_report import (
    N_BINS,
    assemble,
    build_cost,
    grade,
    machine_info,
    markdown,
    plot,
    row_metrics,
)

__all__ = ["ROWS", "ConfigError", "RowSpec", "default_rows", "load_config", "main"]

GRADER = "calibserve.calibration.grading:contains_answer"
ROWS: tuple[str, ...] = ("base", "base-completion", "aligned", "aligned-calibrated", "merge",
                         "merge-calibrated", "cft", "rcft", "sft2", "label-free")
SPEC_KEYS = ("label", "model", "calibration", "chat_template", "completion", "fit", "costs",
             "build")
# How a base model is asked a question it was never tuned to answer in a chat: plain text,
# the reply read to the first newline (the form of the 0.41 measurement).
BASE_COMPLETION = "Question: {question}\nAnswer:"


# --- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    """One row: the checkpoint served, the calibration.json served with it (None: none)."""

    name: str
    label: str
    model: Path
    calibration: Path | None = None
    chat_template: str | None = None  # a built-in name or a file, for a model without one
    completion: str | None = None  # ask by /v1/completions with this `{question}` template
    fit: Path | None = None  # fit `calibration` here from this data directory when missing
    costs: tuple[Path, ...] = ()  # train_info.json / merge report.json / cost records
    build: str = ""  # the command that builds the row

    @property
    def cost_record(self) -> Path | None:
        """Where the calibrate step's cost is recorded (rows fitted here)."""
        return None if self.calibration is None else self.calibration.with_suffix(".cost.json")

    @property
    def cost_files(self) -> tuple[Path, ...]:
        """What a row's build cost is read from: `costs`, and the fit's record when fitted."""
        fitted = (self.cost_record,) if self.fit is not None and self.cost_record else ()
        return (*self.costs, *fitted)


def default_rows(realworld: Path, merge_dir: Path, data: Path) -> dict[str, RowSpec]:
    """The rows in gemma_pair.sh's layout under `realworld` ($CALIBSERVE_HOME/realworld)."""
    models = realworld / "models"
    base, aligned = models / "gemma-3-270m", models / "gemma-3-270m-instruct"
    merged = merge_dir / "model"
    fitted = realworld / "calibrated" / aligned.name / "calibration.json"
    label_free = realworld / "label-free" / "calibration.json"
    tune = (f"calibserve tune --model {base} --data {data / 'train.jsonl'} --out {aligned} "
            "--chat-template gemma")
    pair = "benchmarks/realworld/gemma_pair.sh"

    def tuned(mode: str) -> str:
        return (f"calibserve tune --model {aligned} --data {data / 'train.jsonl'} "
                f"--out {models / f'gemma-3-270m-{mode}'} --calibration-aware {mode} ({pair})")

    aligned_info = aligned / "train_info.json"
    merge_report = merge_dir / "report.json"
    rows = [
        RowSpec("base", "base (raw)", base, chat_template="gemma",
                build="python -m benchmarks.realworld.fetch --only gemma3"),
        RowSpec("base-completion", "base, completion prompt (raw)", base,
                completion=BASE_COMPLETION,
                build="python -m benchmarks.realworld.fetch --only gemma3"),
        RowSpec("aligned", "aligned, raw", aligned, costs=(aligned_info,),
                build=f"{tune} ({pair})"),
        RowSpec("aligned-calibrated", "aligned + calibrator", aligned, fitted, fit=data,
                costs=(aligned_info,), build=f"{tune} ({pair}); the calibrator is fitted here"),
        RowSpec("merge", "merge, raw", merged, costs=(aligned_info, merge_report),
                build=pair),
        RowSpec("merge-calibrated", "merge + its calibrator", merged,
                merged / "calibration.json", costs=(aligned_info, merge_report), build=pair),
        RowSpec("cft", "CFT (seed 004)", models / "gemma-3-270m-cft",
                costs=(aligned_info, models / "gemma-3-270m-cft" / "train_info.json"),
                build=tuned("cft")),
        RowSpec("rcft", "RCFT (seed 004)", models / "gemma-3-270m-rcft",
                costs=(aligned_info, models / "gemma-3-270m-rcft" / "train_info.json"),
                build=tuned("rcft")),
        RowSpec("sft2", "aligned + one more SFT epoch (seed 004's control)",
                models / "gemma-3-270m-sft2",
                costs=(aligned_info, models / "gemma-3-270m-sft2" / "train_info.json"),
                build=tuned("none").replace("-none", "-sft2")),
        RowSpec("label-free", "aligned + label-free calibrator", aligned, label_free,
                costs=(aligned_info,),
                build=f"calibserve calibrate --label-free --reference {base} --model {aligned} "
                      f"--data {data} --out {label_free} (issue 27 item 2; it maps option "
                      "letters only, so short answers stay calibrated: false)"),
    ]
    return {r.name: r for r in rows}


class ConfigError(ValueError):
    """A row configuration that cannot be used; names what is wrong."""


def _setting(key: str, value: Any, where: str, as_path: Any) -> Any:
    """One override of a row, checked: a path, a list of paths, null, or a string."""
    if key == "model":
        return as_path(value, where)
    if key in ("calibration", "fit"):
        return None if value is None else as_path(value, where)
    if key == "costs":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of paths")
        return tuple(as_path(v, where) for v in value)
    if key == "chat_template":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where} must be a built-in name or a file")
        return value
    if key == "completion":
        if value is not None and (not isinstance(value, str) or "{question}" not in value):
            raise ConfigError(f"{where} must be a prompt template holding {{question}}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return value


def load_config(path: Path, rows: Mapping[str, RowSpec]) -> dict[str, RowSpec]:
    """`rows` with the overrides of a YAML/JSON mapping `row -> {key: value}` (keys: label,
    model, calibration (null: none), chat_template, completion (a `{question}` prompt template:
    the row is asked by /v1/completions), fit (a data directory; null: no fit), costs
    (a list), build); a new row name needs `model`. Relative paths are resolved against the
    file's directory."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must map row names to settings")
    out = dict(rows)
    here = Path(path).resolve().parent

    def as_path(v: Any, where: str) -> Path:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where} must be a path")
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else here / p

    for name, settings in doc.items():
        if not isinstance(name, str) or not name or "," in name:
            raise ConfigError(f"{path}: bad row name {name!r}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{path}: {name}: settings must be a mapping")
        unknown = sorted(set(settings) - set(SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{path}: {name}: unknown keys {unknown} (known: "
                              f"{', '.join(SPEC_KEYS)})")
        if name not in out and "model" not in settings:
            raise ConfigError(f"{path}: {name}: a new row needs a model")
        try:
            changes = {k: _setting(k, v, f"{name}.{k}", as_path) for k, v in settings.items()}
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        prior = out.get(name) or RowSpec(name, name, changes["model"])
        spec = dataclasses.replace(prior, **changes)
        if spec.fit is not None and spec.calibration is None:
            raise ConfigError(f"{path}: {name}: fit needs a calibration path to write")
        out[name] = spec
    return out


# --- files ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, text: str) -> None:
    from calibserve.publish import write_atomic

    write_atomic(path, text)


def has_chat_template(model: Path) -> bool:
    """Whether a checkpoint carries a chat template (file, or in tokenizer_config.json)."""
    if (model / "chat_template.jinja").is_file() or (model / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((model / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(cfg.get("chat_template"))


def model_identity(model: Path) -> dict[str, Any]:
    """What the answers of a row depend on in its checkpoint: config.json's hash and each weight
    file's size and modification time (hashing a gigabyte per run would cost more than asking)."""
    files = sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"path": str(model.resolve()), "config_sha256": _sha256(model / "config.json"),
            "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}

# --- serving ----------------------------------------------------------------------------------


@dataclass
class Row:
    """A row during a run: its spec, its answer directory and what happened to it."""

    spec: RowSpec
    dir: Path
    status: str = "pending"  # not built | pending | measured | incomplete | failed
    error: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> Path:
        return self.dir / "answers.jsonl"

    @property
    def eval_cost(self) -> Path:
        return self.dir / "eval-cost.json"


class Run:
    """One table run: items, rows, output directory."""

    def __init__(self, args: argparse.Namespace, specs: Mapping[str, RowSpec]) -> None:
        self.out: Path = args.out
        self.items_file: Path = args.data / "short_test.jsonl"
        all_items = read_jsonl(self.items_file)
        self.n_total = len(all_items)
        self.items = all_items[: args.limit] if args.limit else all_items
        self.max_tokens: int = args.max_tokens
        self.concurrency: int = args.concurrency
        self.timeout_s: float = args.engine_timeout
        self.report_only: bool = args.report_only
        self.params = {"items_sha256": _sha256(self.items_file), "max_tokens": self.max_tokens,
                       "temperature": 0.0, "grader": GRADER, "prompt": "question, verbatim",
                       "n_bins": N_BINS}
        self.rows = [Row(specs[n], self.out / "rows" / n) for n in args.rows]
        self.engine_starts_file = self.out / "engine_starts.json"
        self.loadavg_start = round(os.getloadavg()[0], 2)

    def check_params(self) -> bool:
        """False when `out` was run with other items or settings."""
        path = self.out / "params.json"
        if path.is_file():
            return bool(json.loads(path.read_text()) == self.params)
        _write(path, json.dumps(self.params, indent=1) + "\n")
        return True

    def prompts(self) -> dict[int, str]:
        return {i: str(it["question"]) for i, it in enumerate(self.items)}

    def engine_starts(self) -> list[dict[str, Any]]:
        if not self.engine_starts_file.is_file():
            return []
        doc = json.loads(self.engine_starts_file.read_text())
        return list(doc) if isinstance(doc, list) else []

    def add_engine_start(self, entry: dict[str, Any]) -> None:
        _write(self.engine_starts_file,
               json.dumps([*self.engine_starts(), entry], indent=1) + "\n")


def _template_file(run: Run, spec: RowSpec) -> Path | None:
    """The chat template to give the engine: None when the checkpoint has its own."""
    if has_chat_template(spec.model) or spec.chat_template is None:
        return None
    from calibserve.tune.templates import BUILTIN_TEMPLATES

    if spec.chat_template in BUILTIN_TEMPLATES:
        path = run.out / "templates" / f"{spec.chat_template}.jinja"
        text = BUILTIN_TEMPLATES[spec.chat_template]
        if not path.is_file() or path.read_text() != text:
            _write(path, text)
        return path
    return Path(spec.chat_template).resolve()


def _fit_pending(spec: RowSpec) -> bool:
    if spec.fit is None or spec.calibration is None:
        return False
    record = cost.read_record(spec.cost_record) if spec.cost_record else None
    return not spec.calibration.is_file() or not (record and record.get("complete"))


def _serves_verify(spec: RowSpec) -> bool:
    if spec.calibration is None or not spec.calibration.is_file():
        return _fit_pending(spec)
    with contextlib.suppress(OSError, ValueError):
        return bool(json.loads(spec.calibration.read_text()).get("free_form") == "verify")
    return False


def _classify(run: Run, row: Row) -> None:
    """not built / pending (to ask) / measured (every item answered, same identity)."""
    spec = row.spec
    if not (spec.model / "config.json").is_file():
        row.status = "not built"
        return
    if spec.calibration is not None and not spec.calibration.is_file() and spec.fit is None:
        row.status = "not built"
        return
    if not has_chat_template(spec.model) and spec.chat_template is None and not spec.completion:
        row.status, row.error = "failed", ("the checkpoint has no chat template; give the row "
                                           "a chat_template (--config)")
        return
    if _fit_pending(spec):
        row.status = "pending"
        return
    template = _template_file(run, spec)
    row.identity = {
        "model": model_identity(spec.model),
        "calibration_sha256": _sha256(spec.calibration) if spec.calibration else None,
        "chat_template_sha256": _sha256(template) if template else None,
        **({"completion": spec.completion} if spec.completion else {}),
    }
    recorded = row.dir / "served.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != row.identity:
        for f in (row.answers, row.eval_cost):
            if f.is_file():
                f.replace(f.with_name(f"stale-{f.name}"))
        print(f"{spec.name}: its checkpoint, calibration or template changed; asking again",
              flush=True)
    from benchmarks.realworld.served import done_keys

    done = done_keys(row.answers) >= set(range(len(run.items)))
    row.status = "measured" if done else "pending"


def _fit(run: Run, row: Row, url: str) -> None:
    """`calibserve calibrate` for the row against the group's engine, measured."""
    spec = row.spec
    assert spec.fit is not None and spec.calibration is not None and spec.cost_record
    where = spec.calibration.parent
    data = where / "fit-data"
    for name in ("calibrate.jsonl", "short_calibrate.jsonl"):
        src = spec.fit / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} does not exist (the fit's data)")
        if not (data / name).is_file() or _sha256(data / name) != _sha256(src):
            _write(data / name, src.read_text())
    cmd = [sys.executable, "-m", "calibserve", "calibrate", "--model", str(spec.model),
           "--data", str(data), "--out", str(spec.calibration), "--calibrator", "auto",
           "--upstream", url, "--grader", GRADER, "--max-tokens", str(run.max_tokens),
           "--overwrite"]
    print(f"{spec.name}: fitting its calibrator: {' '.join(cmd)}", flush=True)
    log = where / "calibrate.log"
    with cost.measure() as m, log.open("ab") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
        m.extra["rc"] = rc
    ok = rc == 0 and spec.calibration.is_file()
    cost.add_session(spec.cost_record, "calibrate", m.session(), ok, cmd)
    if not ok:
        raise RuntimeError(f"calibserve calibrate exited with {rc}; log {log}")
    print(f"{spec.name}: calibrator fitted in {m.wall_s:.0f} s ({m.cpu_s / 60:.1f} CPU min)",
          flush=True)


@contextlib.contextmanager
def _engine(run: Run, model: Path, template: Path | None, verify: bool, log: Path
            ) -> Iterator[str]:
    from benchmarks.realworld.served import ENGINE_ARGS, _popen, _stop, _wait
    from calibserve.server.config import EngineSettings
    from calibserve.server.engine import build_command, cuda_available
    from calibserve.server.ports import free_port

    port = free_port()
    extra = [*ENGINE_ARGS, *(["--chat-template", str(template)] if template else [])]
    cmd, env = build_command(model, "engine", "127.0.0.1", port,
                             EngineSettings(extra_args=extra), cuda_available(), verify=verify)
    proc = _popen(cmd, log, env)
    try:
        _wait(f"http://127.0.0.1:{port}/health", proc, log, run.timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def _front(run: Run, rows: Sequence[Row], upstream: str, workdir: Path) -> Iterator[str]:
    """`calibserve serve --config`: one model per row, all on `upstream`."""
    from benchmarks.realworld.served import _popen, _stop, _wait
    from calibserve.server.ports import free_port

    port = free_port()
    models = []
    for row in rows:
        entry: dict[str, Any] = {"name": row.spec.name, "upstreams": [upstream],
                                 "upstream_model": "engine"}
        if row.spec.calibration is not None:
            entry["calibration"] = str(row.spec.calibration.resolve())
        models.append(entry)
    config = {"host": "127.0.0.1", "port": port, "log_level": "warning", "models": models}
    cfg = workdir / "serve.yaml"
    _write(cfg, yaml.safe_dump(config, sort_keys=False))
    log = workdir / "serve.log"
    proc = _popen([sys.executable, "-m", "calibserve", "serve", "--config", str(cfg)], log)
    try:
        _wait(f"http://127.0.0.1:{port}/ready", proc, log, run.timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _serve_group(run: Run, model: Path, rows: list[Row]) -> None:
    """One engine on `model`: fit what needs fitting, then ask every pending row's items."""
    template = _template_file(run, rows[0].spec)
    verify = any(_serves_verify(r.spec) for r in rows)
    workdir = run.out / "engines" / "+".join(r.spec.name for r in rows)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"== {model}: starting an engine for {', '.join(r.spec.name for r in rows)}",
          flush=True)
    c0, t0 = cost.tree_cpu_seconds(), time.monotonic()
    with _engine(run, model, template, verify, workdir / "engine.log") as url:
        start_cpu, start_wall = cost.tree_cpu_seconds() - c0, time.monotonic() - t0
        for row in rows:
            if _fit_pending(row.spec):
                try:
                    _fit(run, row, url)
                except (RuntimeError, OSError) as exc:
                    row.status, row.error = "failed", str(exc)
                    print(f"{row.spec.name}: failed: {exc}", flush=True)
                    continue
                _classify(run, row)
        todo = [r for r in rows if r.status == "pending"]
        if todo:
            c1, t1 = cost.tree_cpu_seconds(), time.monotonic()
            with _front(run, todo, url, workdir) as front:
                start_cpu += cost.tree_cpu_seconds() - c1
                start_wall += time.monotonic() - t1
                for row in todo:
                    _drive_row(run, row, front)
    run.add_engine_start({
        "model": str(model), "rows": [r.spec.name for r in rows],
        "cpu_s": round(start_cpu, 2), "wall_s": round(start_wall, 1),
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")})


def _drive_row(run: Run, row: Row, url: str) -> None:
    from benchmarks.realworld.served import done_keys, drive

    row.dir.mkdir(parents=True, exist_ok=True)
    _write(row.dir / "served.json", json.dumps(row.identity, indent=1) + "\n")
    prompts = run.prompts()
    before = len(done_keys(row.answers) & set(prompts))
    with cost.measure() as m:
        try:
            drive(url, row.spec.name, prompts, row.answers, max_tokens=run.max_tokens,
                  concurrency=run.concurrency, desc=row.spec.name,
                  completion=row.spec.completion)
        except Exception as exc:  # an answer without a confidence, a refused request
            row.status, row.error = "failed", f"{type(exc).__name__}: {exc}"
        after = len(done_keys(row.answers) & set(prompts))
        m.extra["answered"] = after - before
    cost.add_session(row.eval_cost, "eval", m.session(), after == len(prompts))
    if row.status != "failed":
        row.status = "measured" if after == len(prompts) else "incomplete"
    print(f"{row.spec.name}: {m.extra['answered']} answers in {m.wall_s:.0f} s "
          f"({m.cpu_s / 60:.2f} CPU min)", flush=True)


# --- the run ----------------------------------------------------------------------------------


def _row_result(run: Run, row: Row) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from benchmarks.realworld.served import done_keys

    spec = row.spec
    out: dict[str, Any] = {
        "name": spec.name, "label": spec.label, "model": str(spec.model),
        "calibration": str(spec.calibration) if spec.calibration else None,
        "calibration_in_model": bool(spec.calibration
                                     and spec.calibration.parent == spec.model),
        "fitted_here": spec.fit is not None, "status": row.status,
    }
    if row.status == "not built":
        out["command"] = spec.build
        return out, None
    if row.error:
        out["error"] = row.error
    prompts = run.prompts()
    if row.status != "failed" and done_keys(row.answers) >= set(prompts):
        out["status"] = "measured"
    elif row.status not in ("failed",):
        out["status"] = "incomplete"
    if out["status"] != "measured":
        return out, None
    answers = {int(a["i"]): a for a in read_jsonl(row.answers) if int(a["i"]) in prompts}
    score, raw, correct, calibrated, methods = grade(run.items, answers)
    out["metrics"] = row_metrics(score, raw, correct, calibrated, methods)
    out["build_cost"] = build_cost(spec.cost_files)
    record = cost.read_record(row.eval_cost)
    out["eval_cost"] = ({
        "cpu_minutes": record["cpu_minutes"],
        "cpu_s": record["cpu_s"],
        "wall_minutes": round(float(record["wall_s"]) / 60, 2),
        "sessions": len(record["sessions"]),
        "started": [s.get("started") for s in record["sessions"]],
        "loadavg_1m": [s.get("loadavg_1m") for s in record["sessions"]],
    } if record else None)
    if spec.fit is not None and spec.calibration is not None:
        with contextlib.suppress(OSError, ValueError):
            out["free_form_method"] = json.loads(spec.calibration.read_text()).get("free_form")
    from calibserve.calibration import reliability_diagram

    diagram = {"served": reliability_diagram(score, correct, N_BINS),
               "raw": None if np.allclose(score, raw) else
               reliability_diagram(raw, correct, N_BINS)}
    return out, diagram


def report(run: Run) -> int:
    results_rows, diagrams = [], {}
    for row in run.rows:
        res, diagram = _row_result(run, row)
        results_rows.append(res)
        if diagram is not None:
            diagrams[row.spec.name] = diagram
    machine = machine_info()
    machine["loadavg_start"] = run.loadavg_start
    items = {"file": str(run.items_file), "sha256": run.params["items_sha256"],
             "n_total": run.n_total, "n_used": len(run.items)}
    results = assemble(results_rows, items=items, params=run.params,
                       engine_starts=run.engine_starts(), machine=machine)
    _write(run.out / "results.json", json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    _write(run.out / "report.md", text)
    plot(results, diagrams, run.out / "reliability.png")
    print(text)
    print(f"written: {run.out / 'results.json'}, {run.out / 'report.md'}, "
          f"{run.out / 'reliability.png'}")
    return 1 if any(r["status"] == "failed" for r in results_rows) else 0


def execute(run: Run) -> int:
    for row in run.rows:
        _classify(run, row)
        if row.status == "not built":
            print(f"{row.spec.name}: not built ({row.spec.build})", flush=True)
    if not run.report_only:
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in run.rows:
            if row.status == "pending":
                template = _template_file(run, row.spec)
                key = (str(row.spec.model.resolve()), str(template or ""))
                groups.setdefault(key, []).append(row)
        for rows in groups.values():
            try:
                _serve_group(run, rows[0].spec.model, rows)
            except Exception as exc:  # an engine that did not start: the other rows go on
                for row in rows:
                    if row.status == "pending":
                        row.status, row.error = "failed", f"{type(exc).__name__}: {exc}"
                print(f"failed: {exc}", flush=True)
            finally:
                cost.reap_orphans()
    return report(run)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, RowSpec]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.realworld.remedy_table",
        description="Every final model of the real pair served by calibserve, one table.")
    home = Path(os.environ.get("CALIBSERVE_HOME", ".calibserve")).resolve()
    p.add_argument("--realworld", type=Path, default=home / "realworld",
                   help="the real-model tree (default $CALIBSERVE_HOME/realworld)")
    p.add_argument("--merge-dir", type=Path, default=None,
                   help="the merge's output (default REALWORLD/gemma-merge)")
    p.add_argument("--data", type=Path, default=None,
                   help="world facts directory: short_test.jsonl asked, calibrate.jsonl and "
                   "short_calibrate.jsonl fitted on (default REALWORLD/data/world_facts)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML/JSON mapping row -> {model, calibration, chat_template, fit, "
                   "costs, label, build} over the defaults")
    p.add_argument("--rows", default=None,
                   help=f"comma list of rows to run and report (default: all: {', '.join(ROWS)})")
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default REALWORLD/remedy-table)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--engine-timeout", type=float, default=900.0,
                   help="seconds an engine or calibserve may take to come up")
    p.add_argument("--report-only", action="store_true",
                   help="start nothing: report what is recorded")
    args = p.parse_args(argv)
    args.realworld = args.realworld.resolve()
    args.merge_dir = (args.merge_dir or args.realworld / "gemma-merge").resolve()
    args.data = (args.data or args.realworld / "data" / "world_facts").resolve()
    args.out = (args.out or args.realworld / "remedy-table").resolve()
    for name in ("limit", "max_tokens", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be at least 1")
    if args.engine_timeout <= 0:
        p.error("argument --engine-timeout: must be positive")
    if not (args.data / "short_test.jsonl").is_file():
        p.error(f"argument --data: {args.data} has no short_test.jsonl (run `python -m "
                "benchmarks.realworld.fetch --only world_facts`)")
    specs = default_rows(args.realworld, args.merge_dir, args.data)
    if args.config is not None:
        try:
            specs = load_config(args.config, specs)
        except ConfigError as exc:
            p.error(f"argument --config: {exc}")
    names = list(specs) if args.rows is None else [
        n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown or not names:
        p.error(f"argument --rows: unknown rows {unknown or names} (known: {', '.join(specs)})")
    args.rows = list(dict.fromkeys(names))
    if args.out.exists() and not args.out.is_dir():
        p.error(f"argument --out: {args.out} is not a directory")
    return args, specs


def main(argv: Sequence[str] | None = None) -> int:
    args, specs = parse_args(argv)
    run = Run(args, specs)
    run.out.mkdir(parents=True, exist_ok=True)
    if not run.check_params():
        print(f"error: argument --out: {run.out} was run with other items or settings "
              f"(params.json); use another --out", file=sys.stderr)
        return 2
    cost.become_subreaper()
    print(f"output: {run.out}; {len(run.items)} of {run.n_total} items", flush=True)
    return execute(run)


if __name__ == "__main__":
    sys.exit(main())
