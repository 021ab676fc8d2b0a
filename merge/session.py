"""The loaded state of one merge: both parents as one model that can be set to any lambda, an
evaluator per data split, the diversity probe and the per-split sweep caches.

Loading happens once per run; every evaluation (grid, refinement, the calibrate split at the
chosen lambda, the held-out view) goes through `Session` and so through the sweep cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from calibserve.merge.diversity import DiversityProbe
from calibserve.merge.evaluate import SHORT_ANSWER_FILES, MCEvaluator, point_metrics
from calibserve.merge.freeform import FreeFormEvaluator, free_form_metrics, stop_token_ids
from calibserve.merge.model import EvalModel, load_eval_model, resolve_dtype
from calibserve.merge.prepare import Prepared
from calibserve.merge.sweep import (
    Evaluation,
    Point,
    ResultCache,
    data_digest,
    file_identity,
    fingerprint,
)
from calibserve.merge.sweep import run_sweep as sweep_points

__all__ = ["Evaluate", "OnBatch", "Session", "cache_key", "load_session"]

Evaluate = Callable[[float], Evaluation]
# Told how many short answers were just generated (the progress display).
OnBatch = Callable[[int], None]


def cache_key(p: Prepared, split: str) -> str:
    """Everything a cached point of `split` depends on: change any of it and it is recomputed."""
    c = p.config
    return fingerprint(
        {
            "base": file_identity({t.base.file for t in p.plan.tensors}),
            "aligned": file_identity({t.aligned.file for t in p.plan.tensors}),
            "method": c.method,
            "dtype": c.dtype,
            "device": c.device,
            "batch_size": c.batch_size,
            "max_items": c.max_items,
            "data": data_digest(c.data.expanduser() / f"{split}.jsonl"),
            # The short answers scored at each point: their files, grader and reply length.
            "short_answers": _short_answer_key(p, split),
            "diversity": bool(c.diversity) and split == "select",
            "n_bins": c.n_bins,
            "seed": c.seed,
        }
    )


def _short_answer_key(p: Prepared, split: str) -> list[str] | None:
    if not p.short_items.get(split):
        return None
    data = p.config.data.expanduser()
    files = [data_digest(data / f) for f in SHORT_ANSWER_FILES[split] if (data / f).is_file()]
    return [*files, p.config.grader, str(p.config.max_new_tokens)]


@dataclass
class Session:
    """The loaded state of one run: live model, evaluators and per-split caches."""

    prepared: Prepared
    em: EvalModel
    evaluators: dict[str, MCEvaluator]
    probe: DiversityProbe | None
    caches: dict[str, ResultCache]
    # Short-answer evaluators of the splits that have short answers (select, test).
    free_form: dict[str, FreeFormEvaluator]

    def evaluate(self, split: str, with_diversity: bool,
                 on_batch: OnBatch | None = None,
                 on_start: Callable[[float], None] | None = None) -> Evaluate:
        """Evaluate `split` at a lambda; `on_start(lam)` before it is generated, `on_batch(n)`
        after each batch of n short answers."""
        n_bins = self.prepared.config.n_bins

        def run(lam: float) -> Evaluation:
            if on_start is not None:
                on_start(lam)
            self.em.set(lam)
            scores = self.evaluators[split].score(self.em.model)
            probe = self.probe if with_diversity else None
            div = probe.measure(self.em.model) if probe is not None else None
            ff = self.free_form.get(split)
            short = ff.score(self.em.model, on_batch) if ff is not None else None
            return Evaluation(
                point_metrics(scores, n_bins), scores, div,
                free_form_metrics(short, n_bins) if short is not None else None, short,
            )

        return run

    def at(self, split: str, lam: float, on_batch: OnBatch | None = None) -> Point:
        """One (cached) evaluation of `split` at `lam`."""
        return sweep_points([lam], self.evaluate(split, False, on_batch), self.caches[split],
                            split)[0]


def load_session(p: Prepared, work: Path) -> Session:
    """Load both parents, the aligned tokenizer and the evaluators; caches under `work/sweep`."""
    from transformers import AutoTokenizer

    from calibserve.calibration.grading import load_grader

    c = p.config
    em = load_eval_model(p.plan, c.method, resolve_dtype(c.dtype, c.device), c.device)
    tok = AutoTokenizer.from_pretrained(p.plan.aligned.path)
    evaluators = {
        s: MCEvaluator(tok, items, c.batch_size, c.device) for s, items in p.items.items()
    }
    probe = DiversityProbe(tok, p.prompts, seed=c.seed, device=c.device) if p.prompts else None
    caches = {s: ResultCache(work / "sweep", cache_key(p, s)) for s in p.items}
    stops = stop_token_ids(tok, p.plan.aligned.path)
    free_form = {
        s: FreeFormEvaluator(tok, items, load_grader(c.grader), stop_ids=stops,
                             batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                             device=c.device)
        for s, items in p.short_items.items() if items
    }
    return Session(p, em, evaluators, probe, caches, free_form)
