"""`calibserve merge`: the typer command (the lead registers `merge` on the main app).

Every option maps to a `MergeConfig` field, except `--free-form`: after the checkpoint is
written (still staged), fit the free-form confidence methods on the data directory's
short-answer items through the real serving path (a vLLM engine on the written checkpoint), so
one command gives a model with both multiple-choice and free-form calibration. That step composes
server and merge, so merge cannot import it: `merge_command(after_write)` builds the command with
it (the `calibserve` app passes `calibserve.fit.serve_fit.fit_written_model`).

`--free-form` is automatic by default: on when `--data` holds short-answer items in its calibrate
split and an engine can run (this build has the serving path, and vLLM is installed), off
otherwise; the decision is said in one line (and kept in the report's notes). `--evaluator` is
automatic the same way: the vLLM engine that serves scores the sweep where vLLM is installed,
transformers in-process (the reference) otherwise, said in one line.
`--free-form` forces it (refused when it cannot run), `--no-free-form` turns it off. Errors the
user can fix are printed as one line that names the argument, with exit status 2 and no
traceback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from calibserve.calibration.guarantee import DEFAULT_DELTA
from calibserve.calibration.risk import DEFAULT_TARGET_ACCURACIES
from calibserve.merge.config import DEFAULT_GRID, build_config
from calibserve.merge.errors import InvalidConfig, InvalidData, MergeError

if TYPE_CHECKING:  # the pipeline imports torch: not at start-up of the console script
    from calibserve.merge.pipeline import AfterWrite

__all__ = ["merge", "merge_command", "app", "engine_missing", "evaluator_decision",
           "free_form_decision"]

# Says why no vLLM engine can run here (the free-form fit, `--evaluator auto`); None: one can.
EngineCheck = Callable[[], str | None]


def engine_missing() -> str | None:
    """Why no vLLM engine (free-form fit, vLLM evaluator) can run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'calibserve[cpu]' or 'calibserve[gpu]')"
    return None


def free_form_decision(
    requested: bool | None, data: Path, has_step: bool, engine_check: EngineCheck
) -> tuple[bool, str]:
    """Whether the free-form fit runs, and the one line that says so. `requested` None is auto:
    on when `data` holds short-answer items in its calibrate split and an engine can run.
    Forcing it (`True`) where it cannot run raises `InvalidConfig` naming `--free-form`."""
    from calibserve.merge.evaluate import short_answer_split

    if requested is False:
        return False, "free-form fit: off (--no-free-form)"
    n = len(short_answer_split(data, "calibrate")) if data.is_dir() else 0
    why_not: str | None = None
    if not n:
        why_not = (f"{data} has no short-answer items to fit on (short_calibrate.jsonl, or "
                   "short-answer lines in calibrate.jsonl)")
    elif not has_step:
        why_not = "this build of the command has no serving path; run `calibserve merge`"
    else:
        why_not = engine_check()
    if why_not is not None:
        if requested:
            raise InvalidConfig(why_not, "--free-form")
        return False, f"free-form fit: off ({why_not})"
    how = "--free-form" if requested else "auto; --no-free-form turns it off"
    return True, (f"free-form fit: on ({n} short-answer items in the calibrate split, fitted "
                  f"through a vLLM engine on the written model; {how})")


class Method(StrEnum):
    linear = "linear"
    slerp = "slerp"


class CalibratorName(StrEnum):
    """`auto` chooses the family by 5-fold held-out ECE; the others force one family."""

    auto = "auto"
    identity = "identity"
    temperature = "temperature"
    option_temperature = "option_temperature"
    platt = "platt"
    histogram = "histogram"
    isotonic = "isotonic"


class Evaluator(StrEnum):
    auto = "auto"
    transformers = "transformers"
    vllm = "vllm"


def evaluator_decision(requested: Evaluator, engine_check: EngineCheck) -> tuple[str, str]:
    """Which evaluator scores the sweep, and the one line that says so. `auto` is vllm where an
    engine can run (vLLM installed), transformers otherwise; `vllm` where none can run raises
    `InvalidConfig` naming `--evaluator`."""
    if requested is Evaluator.transformers:
        return "transformers", "evaluator: transformers (--evaluator transformers, the reference)"
    why_not = engine_check()
    if requested is Evaluator.vllm:
        if why_not is not None:
            raise InvalidConfig(why_not, "--evaluator")
        return "vllm", "evaluator: vllm (--evaluator vllm)"
    if why_not is not None:
        return "transformers", f"evaluator: transformers (auto: {why_not})"
    return "vllm", ("evaluator: vllm (auto: the engine that serves the merge; --evaluator "
                    "transformers is the in-process reference)")


class Backend(StrEnum):
    mp = "mp"
    ray = "ray"


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DEFAULT_GRID_TEXT = "0:1:0.1"
assert len(DEFAULT_GRID) == 11


def merge_command(
    after_write: AfterWrite | None = None, engine_check: EngineCheck = engine_missing
) -> Callable[..., None]:
    """The `merge` command; `after_write` is the `--free-form` step (None: refused, and off
    in auto); `engine_check` says why an engine cannot run (None: it can)."""

    def merge(
        base: Annotated[str, typer.Option("--base", help="Base checkpoint: directory or Hub id.")],
        aligned: Annotated[
            str, typer.Option("--aligned", help="Aligned checkpoint: directory or Hub id.")
        ],
        data: Annotated[
            Path,
            typer.Option("--data",
                         help="Directory with select.jsonl, calibrate.jsonl [test.jsonl]."),
        ],
        out: Annotated[Path, typer.Option("--out", help="Output directory (created atomically).")],
        grid: Annotated[
            str,
            typer.Option(
                "--grid",
                help="Lambdas: a list 0,0.3,1 or a range start:stop:step; "
                "values above 1 extrapolate past the aligned model.",
            ),
        ] = DEFAULT_GRID_TEXT,
        method: Annotated[Method, typer.Option("--method", help="Interpolation.")] = Method.linear,
        select: Annotated[
            str,
            typer.Option(
                "--select",
                help="[OBJECTIVE:]RULE. Rules: max-accuracy, min-ece, knee, min-ece-at-accuracy. "
                "Objectives (what the rule is applied to): multiple-choice (default), free-form "
                "(the short answers' accuracy and ECE), combined (the mean of both); e.g. "
                "free-form:knee, combined:min-ece-at-accuracy.",
            ),
        ] = "max-accuracy",
        tolerance: Annotated[
            float, typer.Option("--tolerance", help="Accuracy tolerance of min-ece-at-accuracy.")
        ] = 0.01,
        calibrator: Annotated[
            CalibratorName,
            typer.Option("--calibrator", help="Calibrator fitted on the calibrate split; auto: the "
                         "family with the lowest held-out ECE (5-fold cross-validation)."),
        ] = CalibratorName.auto,
        diversity: Annotated[
            bool, typer.Option("--diversity/--no-diversity", help="Measure output diversity.")
        ] = False,
        refine: Annotated[
            bool, typer.Option("--refine/--no-refine", help="Add points around the frontier.")
        ] = True,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = "cpu",
        dtype: Annotated[DType, typer.Option("--dtype", help="Evaluation dtype.")] = DType.float32,
        batch_size: Annotated[
            int, typer.Option("--batch-size", help="Evaluation batch size.")
        ] = 32,
        shard_size: Annotated[
            str, typer.Option("--shard-size", help="Maximum output shard size, e.g. 2GB.")
        ] = "2GB",
        target_accuracy: Annotated[
            list[float] | None,
            typer.Option(
                "--target-accuracy", help="Accuracy targets for escalation thresholds (repeatable)."
            ),
        ] = None,
        max_error: Annotated[
            list[float] | None,
            typer.Option(
                "--max-error", help="Also certify the option-letter method's threshold whose "
                "kept answers are wrong at most this often with probability 1 - --delta "
                "(repeatable; serve with --threshold guaranteed); refused when it cannot be."),
        ] = None,
        delta: Annotated[
            float, typer.Option("--delta", help="With --max-error: the chance the "
                                "certificate may be wrong.")
        ] = DEFAULT_DELTA,
        batch: Annotated[
            int | None, typer.Option("--batch", metavar="M", help="With --max-error: certify "
                                     "every batch of at least M kept answers (a day's traffic, "
                                     "say), not only the long-run rate (costs coverage; not "
                                     "--batch-size).")
        ] = None,
        max_items: Annotated[
            int | None, typer.Option("--max-items", help="Use at most N items per split.")
        ] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing OUT when done.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
        short_answers: Annotated[
            bool, typer.Option(
                "--short-answers/--no-short-answers",
                help="Generate and grade the short-answer items of --data (short_select.jsonl, "
                "short_test.jsonl, or short-answer lines of select/test.jsonl) at every lambda "
                "and report their free-form accuracy, ECE, Brier, NLL and AUROC."),
        ] = True,
        grader: Annotated[
            str, typer.Option(
                "--grader",
                help="Grader of short answers: exact (normalised match, the default), contains "
                "(the gold is a whole-word run of the reply's first line), or module:function."),
        ] = "exact",
        max_new_tokens: Annotated[
            int, typer.Option("--max-new-tokens",
                              help="Longest short answer generated, in tokens.")
        ] = 16,
        free_form: Annotated[
            bool | None, typer.Option(
                "--free-form/--no-free-form",
                help="Fit the free-form methods (token statistics; verify when the tokenizer "
                "has yes/no tokens) on the short-answer items of --data (short_calibrate.jsonl, "
                "short_test.jsonl, or short-answer lines of calibrate/test.jsonl) through a vLLM "
                "engine on the written checkpoint. Default: on when --data has short-answer "
                "items and vLLM can run, off otherwise."),
        ] = None,
        evaluator: Annotated[
            Evaluator, typer.Option(
                "--evaluator",
                help="What scores the sweep: vllm (the engine that serves the merge, weights set "
                "in place on every worker; needs vLLM) or transformers (in-process, the "
                "reference: three copies of the weights on one device). Default auto: vllm "
                "when vLLM is installed, transformers otherwise, said in one line."),
        ] = Evaluator.auto,
        tensor_parallel_size: Annotated[
            int, typer.Option("--tensor-parallel-size",
                              help="Devices the vLLM evaluator's engine shards the model over "
                              "(with several nodes: the devices of one node).")
        ] = 1,
        pipeline_parallel_size: Annotated[
            int, typer.Option("--pipeline-parallel-size",
                              help="Pipeline stages of the vLLM evaluator's engine (with several "
                              "nodes: the number of nodes, over a Ray cluster).")
        ] = 1,
        distributed_executor_backend: Annotated[
            Backend | None, typer.Option(
                "--distributed-executor-backend",
                help="How the vLLM evaluator's engine runs its ranks: mp (processes on this "
                "node) or ray (a Ray cluster: several nodes; `ray start` on each first). "
                "Default: vLLM's choice.")
        ] = None,
        gpu_memory_utilization: Annotated[
            float | None, typer.Option(
                "--gpu-memory-utilization",
                help="Fraction of each GPU the vLLM evaluator's engine may take (weights and "
                "KV cache); default 0.9 on a GPU, 0.3 of host RAM on CPU, where the KV cache is "
                "VLLM_CPU_KVCACHE_SPACE GiB (default 1).")
        ] = None,
        dry_run: Annotated[
            bool, typer.Option(
                "--dry-run",
                help="Print the memory plan (bytes per device: weights, parents, KV cache, per "
                "evaluator and tensor-parallel size) from the configs alone, and stop.")
        ] = False,
        device_memory: Annotated[
            str | None, typer.Option(
                "--device-memory",
                help="Memory of one device for the plan, e.g. 80GB (default: what torch sees "
                "on the GPU, else the host's RAM).")
        ] = None,
        label_free: Annotated[
            bool, typer.Option(
                "--label-free",
                help="Fit the option-letter map with no labels: the chosen point's option "
                "temperature tempered towards the base's option distribution (DACA) on the "
                "calibrate prompts where both pick the same option; the calibrate answers are "
                "not read, no thresholds are written (they need labels), and replies say "
                "calibration: label-free. The select split still chooses lambda by its "
                "answers."),
        ] = False,
    ) -> None:
        """Merge BASE and ALIGNED at the Pareto-optimal lambda, calibrate it, write it to OUT."""
        from calibserve.merge.pipeline import run_merge

        try:
            if not data.is_dir():
                raise InvalidData(
                    f"{data} is not a directory with select.jsonl and calibrate.jsonl", "--data")
            if label_free and max_error:
                raise InvalidConfig("a label-free fit has no thresholds: a certified error "
                                    "rate needs labelled data", "--max-error")
            if label_free and target_accuracy:
                raise InvalidConfig("a label-free fit has no thresholds: a threshold that "
                                    "promises an accuracy needs labelled data",
                                    "--target-accuracy")
            if dry_run and evaluator is not Evaluator.auto:  # a plan needs no engine
                used, evaluator_line = evaluator.value, ""
            else:
                used, evaluator_line = evaluator_decision(evaluator, engine_check)
            config = build_config(
                base=base,
                aligned=aligned,
                data=data,
                out=out,
                grid=grid,
                method=method.value,
                select=select,
                tolerance=tolerance,
                calibrator=calibrator.value,
                diversity=diversity,
                refine=refine,
                device=device,
                dtype=dtype.value,
                batch_size=batch_size,
                shard_size=shard_size,
                target_accuracy=target_accuracy if target_accuracy
                else list(DEFAULT_TARGET_ACCURACIES),
                max_error=list(max_error or []),
                delta=delta,
                batch=batch,
                max_items=max_items,
                overwrite=overwrite,
                short_answers=short_answers,
                grader=grader,
                max_new_tokens=max_new_tokens,
                label_free=label_free,
                evaluator=used,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                distributed_executor_backend=(distributed_executor_backend.value
                                              if distributed_executor_backend else None),
                gpu_memory_utilization=gpu_memory_utilization,
            )
            if used == "vllm" and not dry_run:
                from calibserve.merge.engine import check_backend

                check_backend(config.distributed_executor_backend)
            if dry_run or used == "vllm":
                from calibserve.merge.memory_plan import check_plan

                report = check_plan(config, device_memory, refuse=not dry_run)
                if dry_run:
                    typer.echo(report)
                    return
            if label_free and free_form is None:
                fit, line = False, ("free-form fit: off (--label-free: the free-form methods "
                                    "need graded answers; --free-form fits them anyway)")
            else:
                fit, line = free_form_decision(free_form, data, after_write is not None,
                                               engine_check)
            if not quiet:
                typer.echo(evaluator_line, err=True)
                typer.echo(line, err=True)
            notes = [evaluator_line, line]
            if fit and grader != "exact":
                notes.append(f"the sweep grades short answers with {grader}; the free-form fit "
                             "after the write grades with its own default (exact)")
            run_merge(config, progress=not quiet, after_write=after_write if fit else None,
                      notes=notes)
        except MergeError as exc:
            where = f"Invalid value for '{exc.param}': " if exc.param else ""
            typer.echo(f"Error: {where}{exc.message}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted: rerun the same command to resume the sweep.", err=True)
            raise typer.Exit(130) from None
        sys.stdout.flush()

    return merge


merge = merge_command()


app = typer.Typer(add_completion=False, help="calibserve merge")
app.command("merge")(merge)
