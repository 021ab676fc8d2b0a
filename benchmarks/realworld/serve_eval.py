"""SmolLM2-135M-Instruct served by `calibserve serve`, calibrated by `calibserve calibrate`, scored
on held-out real data through the openai SDK (issue 13 item 2).

    .venv/bin/python -m benchmarks.realworld.serve_eval            # every step, resumable
    .venv/bin/python -m benchmarks.realworld.serve_eval --step calibrate   # one step

Steps (each skips what is already done, so a run can be split and resumed):

1. `prepare`: seeded subsets of the realworld splits (`benchmarks.realworld.fetch` builds them):
   multiple-choice calibrate items (the task's calibrate split) and held-out test items (its test
   split), keeping items whose prompt fits `--max-prompt-tokens` in both wordings; short answers
   for the free-form methods (calibrate and test splits) from `--short-task`: world_facts by
   default (real facts generated from registry packages, asked as questions followed by
   "Answer in a few words."), or qa_wikidata (BIG-bench sentence stems, when it could be fetched).
2. `calibrate`: `calibserve calibrate --calibrator auto` on those: the option-letter method on the
   multiple-choice items (in the eval contract's wording, `question : ... A ... B ...`, followed
   by "Answer with the letter of the correct option." unless `--calibration-wording contract`;
   the items carry it as their own `prompt`), the free-form
   methods on the short answers through the serving path (`--upstream`: a vLLM engine started
   with the managed engine's command line, `--enforce-eager`), graded by
   `benchmarks.realworld.grading:contains_answer`.
3. `serve` (or one of its parts `mc-calibration-wording`, `mc-user-wording`, `short-answer`):
   one `calibserve serve` with that calibration.json; the held-out items through
   `openai.AsyncOpenAI`, as a user sends them (no logprobs asked): the calibration prompts'
   wording, a user's own wording (`A. ...` on separate lines, "Reply with the letter ..."), and
   the short-answer test split. Each answer is appended to a JSONL file as it arrives.
4. `report`: accuracy, ECE raw and calibrated (15 bins), AUROC per run; reliability diagrams
   (`reliability.png`); `results.json` and `report.md` in the output directory.

The correctness of a multiple-choice reply is its leading option letter against the gold one (a
reply that names no letter is wrong); the confidence is the served `choices[0].confidence`
(`raw` and the calibrated `score`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import utc_now
from benchmarks.realworld.grading import contains_answer, short_answer_prompt

SHORT_TASKS = ("world_facts", "qa_wikidata")
FACT_INSTRUCTION = "Answer in a few words."


def short_prompt(task: str, question: str) -> str:
    """The user message of a short-answer item (calibration and test alike)."""
    if task == "qa_wikidata":
        return short_answer_prompt(question)  # a sentence stem to complete
    return f"{question} {FACT_INSTRUCTION}"


def short_split_file(task: str, split: str) -> str:
    """Where a task's short answers of `split` are: world_facts keeps them beside its
    multiple-choice splits (`short_*.jsonl`, as merge.evaluate.SHORT_ANSWER_FILES reads)."""
    return f"{split}.jsonl" if task == "qa_wikidata" else f"short_{split}.jsonl"

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")
STEPS = ("prepare", "calibrate", "serve", "report")
SERVED_NAME = "smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
N_BINS = 15


# --- prompts ----------------------------------------------------------------------------------


WORDINGS = ("instructed", "contract")
INSTRUCTION = "Answer with the letter of the correct option."


def calibration_prompt(item: Mapping[str, Any], wording: str = "instructed") -> str:
    """The wording `calibserve calibrate` fits on: the eval contract's (`format_mc_prompt`,
    `question : ... A ... B ...`), and for `instructed` the instruction to answer with a letter
    after it (written into the calibration items as their own `prompt`)."""
    from calibserve.calibration.mc_prompt import format_mc_prompt

    bare = format_mc_prompt({k: v for k, v in item.items() if k != "prompt"})
    return bare if wording == "contract" else f"{bare}\n{INSTRUCTION}"


def user_prompt(item: Mapping[str, Any]) -> str:
    """A user's own wording of the same item."""
    letters = LETTERS[: len(item["choices"])]
    options = "\n".join(f"{k}. {c}" for k, c in zip(letters, item["choices"], strict=True))
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return (f"{item['question']}\n\n{options}\n\n"
            f"Reply with the letter of the correct option ({listed}).")


def reply_letter(reply: str, n_options: int) -> int | None:
    """The option a reply names by its leading letter ("B", "B.", "B) ...": calibration's
    `option_letter`, the grader `calibserve calibrate` fits `no_letter` with), else None."""
    from calibserve.calibration.answers import option_letter

    letter = option_letter(reply, LETTERS[:n_options])
    return None if letter is None else LETTERS.index(letter)


# --- files ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


class Run:
    """Paths and parameters of one benchmark run (its output directory)."""

    def __init__(self, args: argparse.Namespace) -> None:
        # Absolute: the serve step's YAML config resolves relative paths against its own folder.
        home = Path(os.environ.get("CALIBSERVE_HOME", ".calibserve")).resolve()
        self.realworld = Path(args.realworld or home / "realworld").resolve()
        self.model = self.realworld / "models" / MODEL_NAME
        self.params = {
            "task": args.task, "n_calibrate": args.n_calibrate, "n_test": args.n_test,
            "n_short_calibrate": args.n_short_calibrate, "n_short_test": args.n_short_test,
            "max_prompt_tokens": args.max_prompt_tokens, "seed": args.seed,
            "held_out": args.held_out, "calibration_wording": args.calibration_wording,
        }
        self.short_task = str(args.short_task)
        # Runs prepared before world_facts existed used qa_wikidata and recorded no short_task.
        if self.short_task != "qa_wikidata":
            self.params["short_task"] = self.short_task
        self.wording = str(args.calibration_wording)
        name = (f"{args.task}-c{args.n_calibrate}-t{args.n_test}-"
                f"s{args.n_short_calibrate}x{args.n_short_test}-p{args.max_prompt_tokens}-"
                f"seed{args.seed}" + ("" if args.held_out == "test" else
                                      f"-{args.held_out.replace(',', '+')}")
                + ("" if args.calibration_wording == "contract"
                   else f"-{args.calibration_wording}")
                + ("" if args.short_task == "qa_wikidata" or not args.n_short_calibrate
                   else f"-{args.short_task}"))
        self.out = Path(args.out or home / "realworld" / "serve_eval" / name).resolve()
        self.data = self.out / "calibrate-data"
        self.calibration = self.out / "calibration.json"
        self.concurrency = args.concurrency
        self.max_model_len = args.max_prompt_tokens + 64
        # --n-short-calibrate 0: multiple choice only (no free-form fit, no short-answer step).
        self.short_answers = args.n_short_calibrate > 0

    def timed(self, step: str, fn: Callable[[], bool]) -> None:
        """Run a step; record its wall time and the load when it did any work."""
        t0 = time.monotonic()
        if not fn():
            print(f"{step}: already done", flush=True)
            return
        times_path = self.out / "steps.json"
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        times[step] = {"wall_s": round(time.monotonic() - t0, 1),
                       "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                       "loadavg_1m": round(os.getloadavg()[0], 2)}
        times_path.write_text(json.dumps(times, indent=1))


# --- steps ------------------------------------------------------------------------------------


def prepare(run: Run) -> bool:
    params_path = run.out / "params.json"
    if params_path.is_file():
        if json.loads(params_path.read_text()) != run.params:
            sys.exit(f"error: {run.out} was prepared with other parameters; use another --out")
        return False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.model)

    def n_tokens(prompt: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(run.params["seed"])
    limit = int(run.params["max_prompt_tokens"])
    task_dir = run.realworld / "data" / str(run.params["task"])

    def pick(splits: str, n: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
        items = [it for split in splits.split(",")
                 for it in read_jsonl(task_dir / f"{split}.jsonl")]
        rng.shuffle(items)
        picked: list[dict[str, Any]] = []
        seen = 0
        for item in items:
            seen += 1
            if max(n_tokens(calibration_prompt(item, run.wording)),
                   n_tokens(user_prompt(item))) <= limit:
                picked.append(item)
                if len(picked) == n:
                    break
        if len(picked) < n:
            sys.exit(f"error: only {len(picked)} {splits} items fit {limit} prompt tokens")
        return picked, {"examined": seen, "kept": len(picked)}

    def pick_short(split: str, n: int) -> list[dict[str, Any]]:
        path = run.realworld / "data" / run.short_task / short_split_file(run.short_task, split)
        if not path.is_file():
            sys.exit(f"error: {path} does not exist; run `python -m benchmarks.realworld.fetch "
                     f"--only {run.short_task}` first")
        items = read_jsonl(path)
        if len(items) < n:
            sys.exit(f"error: {path} has {len(items)} items, fewer than the {n} asked for")
        rng.shuffle(items)
        return [{**it, "question": short_prompt(run.short_task, it["question"])}
                for it in items[:n]]

    run.data.mkdir(parents=True, exist_ok=True)
    cal, cal_info = pick("calibrate", int(run.params["n_calibrate"]))
    test, test_info = pick(str(run.params["held_out"]), int(run.params["n_test"]))
    if run.wording != "contract":  # calibrate asks each item in its own `prompt`
        cal = [{**it, "prompt": calibration_prompt(it, run.wording)} for it in cal]
    write_jsonl(run.data / "calibrate.jsonl", cal)
    write_jsonl(run.out / "test_mc.jsonl", test)
    if run.short_answers:
        write_jsonl(run.data / "short_calibrate.jsonl",
                    pick_short("calibrate", int(run.params["n_short_calibrate"])))
        write_jsonl(run.out / "test_short.jsonl",
                    pick_short("test", int(run.params["n_short_test"])))
    info = {"calibrate": cal_info, "test": test_info}
    (run.out / "selection.json").write_text(json.dumps(info, indent=1))
    params_path.write_text(json.dumps(run.params, indent=1))
    return True


def calibrate(run: Run) -> bool:
    if run.calibration.is_file():
        return False
    from benchmarks.realworld.served import engine

    cmd = [sys.executable, "-m", "calibserve", "calibrate", "--model", str(run.model),
           "--data", str(run.data), "--out", str(run.calibration), "--calibrator", "auto"]
    if not run.short_answers:
        print("running:", " ".join([*cmd, "--no-free-form"]), flush=True)
        subprocess.run([*cmd, "--no-free-form"], check=True)
    else:
        with engine(run.model, SERVED_NAME, run.out / "calibrate-engine.log",
                    run.max_model_len) as url:
            cmd += ["--upstream", url,
                    "--grader", "benchmarks.realworld.grading:contains_answer"]
            print("running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    if not run.calibration.is_file():
        sys.exit(f"error: calibserve calibrate wrote no {run.calibration}")
    return True


SERVED_STEPS = ("mc-calibration-wording", "mc-user-wording", "short-answer")


def _served_prompts(run: Run, step: str) -> tuple[dict[int, str], int]:
    """The prompts of a served step and its `max_tokens`."""
    if step == "short-answer":
        items = read_jsonl(run.out / "test_short.jsonl")
        return {i: str(it["question"]) for i, it in enumerate(items)}, 16
    items = read_jsonl(run.out / "test_mc.jsonl")
    if step == "mc-calibration-wording":
        return {i: calibration_prompt(it, run.wording) for i, it in enumerate(items)}, 1
    return {i: user_prompt(it) for i, it in enumerate(items)}, 4


def served(run: Run, steps: Sequence[str]) -> bool:
    """The served steps not yet complete, all against one `calibserve serve`."""
    from benchmarks.realworld.served import calibserve_serve, done_keys, drive

    todo = []
    for step in steps:
        if step == "short-answer" and not run.short_answers:
            continue
        prompts, max_tokens = _served_prompts(run, step)
        out = run.out / f"{step}.jsonl"
        if len(done_keys(out) & set(prompts)) < len(prompts):
            todo.append((step, prompts, max_tokens, out))
    if not todo:
        return False
    with calibserve_serve(run.model, SERVED_NAME, run.calibration, run.out,
                          run.max_model_len) as url:
        for step, prompts, max_tokens, out in todo:
            t0 = time.monotonic()
            drive(url, SERVED_NAME, prompts, out, max_tokens=max_tokens,
                  concurrency=run.concurrency, desc=step)
            print(f"{step}: {len(prompts)} items in {time.monotonic() - t0:.0f} s", flush=True)
    return True


# --- report -----------------------------------------------------------------------------------


def _metrics(raw: np.ndarray, score: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    from calibserve.calibration import auroc, ece

    def finite(x: float) -> float | None:
        return None if not np.isfinite(x) else round(float(x), 4)

    return {
        "n": int(correct.size), "accuracy": finite(float(correct.mean())),
        "mean_raw": finite(float(raw.mean())), "mean_calibrated": finite(float(score.mean())),
        "ece_raw": finite(ece(raw, correct, N_BINS)),
        "ece_calibrated": finite(ece(score, correct, N_BINS)),
        "auroc_raw": finite(auroc(raw, correct)), "auroc_calibrated": finite(auroc(score, correct)),
    }


def _load(run: Run, step: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Served raw, calibrated score, correctness and serving method of each item, in order."""
    rows = {r["i"]: r for r in read_jsonl(run.out / f"{step}.jsonl")}
    if step == "short-answer":
        items = read_jsonl(run.out / "test_short.jsonl")
        correct = [contains_answer(rows[i]["reply"], it["answer"], it.get("aliases", []))
                   for i, it in enumerate(items)]
    else:
        items = read_jsonl(run.out / "test_mc.jsonl")
        correct = [reply_letter(rows[i]["reply"], len(it["choices"])) == it["answer"]
                   for i, it in enumerate(items)]
    conf = [rows[i]["confidence"] for i in range(len(items))]
    return (np.asarray([c["raw"] for c in conf], np.float64),
            np.asarray([c["score"] for c in conf], np.float64),
            np.asarray(correct, bool), np.asarray([str(c["method"]) for c in conf]))


def _floor(m: Mapping[str, Any]) -> bool:
    """The issue's floor: calibrated ECE <= 0.05 and <= half the raw ECE on >= 1,000 items."""
    return (m["ece_calibrated"] is not None and m["ece_raw"] is not None and m["n"] >= 1000
            and m["ece_calibrated"] <= 0.05 and m["ece_calibrated"] <= m["ece_raw"] / 2)


def report(run: Run) -> None:
    from calibserve.calibration import reliability_diagram

    doc = json.loads(run.calibration.read_text())
    results: dict[str, Any] = {"params": run.params, "calibration": _calibration_summary(doc),
                               "served": {}, "steps": _read(run.out / "steps.json"),
                               "selection": _read(run.out / "selection.json"),
                               "machine": _machine()}
    diagrams: dict[str, Any] = {}
    from benchmarks.realworld.served import done_keys

    for step in SERVED_STEPS:
        if step == "short-answer" and not run.short_answers:
            continue
        if len(done_keys(run.out / f"{step}.jsonl")) < len(_served_prompts(run, step)[0]):
            print(f"{step}: not complete (run --step serve), left out", flush=True)
            continue
        raw, score, correct, methods = _load(run, step)
        entry = _metrics(raw, score, correct)
        names, counts = np.unique(methods, return_counts=True)
        entry["served_methods"] = {str(k): int(v) for k, v in zip(names, counts, strict=True)}
        if step != "short-answer":
            entry["floor_met"] = _floor(entry)
            # Per serving method: `answer` (the reply's first token is a letter) and
            # `no_letter` (a word first), each through the map fitted on its own kind of reply.
            entry["by_method"] = {}
            for name in names:
                sub = methods == name
                entry["by_method"][str(name)] = _metrics(raw[sub], score[sub], correct[sub])
                entry["by_method"][str(name)]["floor_met"] = _floor(entry["by_method"][str(name)])
        results["served"][step] = entry
        diagrams[step] = {"raw": reliability_diagram(raw, correct, N_BINS),
                          "calibrated": reliability_diagram(score, correct, N_BINS),
                          "metrics": entry}
    (run.out / "results.json").write_text(json.dumps(results, indent=1))
    if diagrams:
        _plot(diagrams, run.out / "reliability.png", str(run.params["task"]), run.short_task)
    text = _markdown(results)
    (run.out / "report.md").write_text(text)
    print(text)
    print(f"written: {run.out / 'results.json'}, {run.out / 'report.md'}, "
          f"{run.out / 'reliability.png'}")


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": utc_now()}


def _calibration_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"multiple_choice": doc.get("multiple_choice"),
                           "free_form": doc.get("free_form"), "methods": {}}
    for name, entry in doc.get("methods", {}).items():
        fit = entry.get("fit") or {}
        out["methods"][name] = {k: fit.get(k) for k in (
            "calibrator", "n", "accuracy", "ece_raw", "ece_calibrated", "held_out_ece")}
    return out


def _plot(diagrams: Mapping[str, Any], path: Path, task: str, short_task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(diagrams), figsize=(4.6 * len(diagrams), 4.6), squeeze=False)
    for ax, (step, d) in zip(axes[0], diagrams.items(), strict=True):
        m = d["metrics"]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for kind, colour in (("raw", "tab:red"), ("calibrated", "tab:blue")):
            rd = d[kind]
            pts = [(c, a, k) for c, a, k in zip(rd["mean_confidence"], rd["accuracy"],
                                                rd["counts"], strict=True) if k]
            xs, ys, ks = zip(*pts, strict=True)
            sizes = [20 + 180 * k / max(ks) for k in ks]
            ax.plot(xs, ys, color=colour, lw=1)
            ax.scatter(xs, ys, s=sizes, color=colour, alpha=0.7,
                       label=f"{kind}: ECE {m[f'ece_{kind}']:.3f}")
        what = f"{short_task} (free-form)" if step == "short-answer" else f"{task}, {step[3:]}"
        ax.set_title(f"{what}\nn={m['n']}, accuracy {m['accuracy']:.3f}", fontsize=10)
        ax.set_xlabel("confidence (bin mean)")
        ax.set_ylabel("accuracy in bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{MODEL_NAME} served by calibserve (15 bins; dot area = items)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(results: Mapping[str, Any]) -> str:
    lines = ["| run | n | accuracy | mean conf raw -> cal | ECE raw | ECE calibrated | "
             "AUROC raw / cal | served methods | floor |", "|---|---|---|---|---|---|---|---|---|"]
    for step, m in results["served"].items():
        rows = [(step, m, m["served_methods"])]
        rows += [(f"{step}, {method} replies only", sub, {method: sub["n"]})
                 for method, sub in (m.get("by_method") or {}).items()]
        for name, row, methods in rows:
            floor = ("-" if step == "short-answer" else
                     ("met" if row["floor_met"] else "NOT met"))
            lines.append(
                f"| {name} | {row['n']} | {row['accuracy']} | {row['mean_raw']} -> "
                f"{row['mean_calibrated']} | {row['ece_raw']} | {row['ece_calibrated']} | "
                f"{row['auroc_raw']} / {row['auroc_calibrated']} | {methods} | {floor} |")
    lines.append("")
    lines.append("Fitted (calibserve calibrate, on the calibrate items):")
    for name, fit in results["calibration"]["methods"].items():
        if fit.get("n"):
            lines.append(f"- {name}: {fit['calibrator']}, n={fit['n']}, accuracy "
                         f"{fit['accuracy']:.3f}, ECE {fit['ece_raw']:.3f} -> "
                         f"{fit['ece_calibrated']:.3f}")
    lines.append("")
    lines.append("Step times: " + ", ".join(
        f"{k} {v['wall_s']:.0f} s (load {v['loadavg_1m']})"
        for k, v in (results["steps"] or {}).items()))
    return "\n".join(lines) + "\n"


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--step", choices=(*STEPS, *SERVED_STEPS, "all"), default="all",
                   help="run one step (each skips what is done); default: all in order")
    p.add_argument("--task", default="mmlu", choices=("mmlu", "social_iqa", "strategyqa"),
                   help="the multiple-choice task")
    p.add_argument("--n-calibrate", type=int, default=600)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--short-task", choices=SHORT_TASKS, default="world_facts",
                   help="the short answers of the free-form fit and test (default world_facts)")
    p.add_argument("--n-short-calibrate", type=int, default=400,
                   help="short-answer items for the free-form fit (0: multiple choice only)")
    p.add_argument("--n-short-test", type=int, default=400)
    p.add_argument("--max-prompt-tokens", type=int, default=192,
                   help="keep multiple-choice items whose prompt fits this (both wordings)")
    p.add_argument("--held-out", default="test",
                   help="the task's splits the held-out items come from (comma list; never "
                   "calibrate): social_iqa and strategyqa need test,select for 1,000 items")
    p.add_argument("--calibration-wording", choices=WORDINGS, default="instructed",
                   help="how the calibration prompts ask: the eval contract's wording followed "
                   "by 'Answer with the letter of the correct option.' (instructed), or the bare "
                   "contract wording (contract: this instruction-tuned model then answers most "
                   "items with a word, see RESULTS.md)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--realworld", type=Path, default=None,
                   help="the fetch output (default $CALIBSERVE_HOME/realworld)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default $CALIBSERVE_HOME/realworld/serve_eval/<params>)")
    args = p.parse_args(argv)
    held = args.held_out.split(",")
    if "calibrate" in held or not set(held) <= {"test", "select"}:
        p.error("--held-out: a comma list of test and select (the calibrate split is fitted on)")
    for name in ("n_calibrate", "n_test", "max_prompt_tokens", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_short_calibrate < 0 or args.n_short_test < (1 if args.n_short_calibrate else 0):
        p.error("--n-short-calibrate must be >= 0 (0: no short answers) and --n-short-test "
                "at least 1 when it is not 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(args)
    if not (run.model / "config.json").is_file() or not (run.realworld / "data").is_dir():
        sys.exit(f"error: {run.realworld} lacks the model or data; run "
                 "`python -m benchmarks.realworld.fetch --only smollm2,data` first")
    run.out.mkdir(parents=True, exist_ok=True)
    actions: dict[str, Callable[[], Any]] = {
        "prepare": lambda: prepare(run),
        "calibrate": lambda: calibrate(run),
        "serve": lambda: served(run, SERVED_STEPS),
        **{step: functools.partial(served, run, (step,)) for step in SERVED_STEPS},
    }
    steps = STEPS if args.step == "all" else (args.step,)
    print(f"run directory: {run.out}", flush=True)
    for step in steps:
        print(f"== {step}", flush=True)
        if step == "report":
            report(run)
        else:
            run.timed(step, actions[step])


if __name__ == "__main__":
    main()
