"""The loaded state of one merge: the backend that scores any lambda (the transformers reference
or the vLLM engine, merge/backends.py) and the per-split sweep caches.

Loading happens once per run; every evaluation (grid, refinement, the calibrate split at the
chosen lambda, the held-out view) goes through `Session` and so through the sweep cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibserve.merge.backends import Backend, OnBatch, load_backend
from calibserve.merge.evaluate import SHORT_ANSWER_FILES, point_metrics
from calibserve.merge.freeform import free_form_metrics
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


def cache_key(p: Prepared, split: str) -> str:
    """Everything a cached point of `split` depends on: change any of it and it is recomputed."""
    c = p.config
    parts: dict[str, Any] = {
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
    if c.evaluator != "transformers":  # the reference's keys stay those of earlier caches
        # "served-top-k": multiple choice read from the served top alternatives (engine.py).
        parts["evaluator"] = [c.evaluator, c.tensor_parallel_size, "served-top-k", 2]
        if c.pipeline_parallel_size != 1:  # older caches keep their key
            parts["evaluator"].append(f"pp{c.pipeline_parallel_size}")
    return fingerprint(parts)


def _short_answer_key(p: Prepared, split: str) -> list[str] | None:
    if not p.short_items.get(split):
        return None
    data = p.config.data.expanduser()
    files = [data_digest(data / f) for f in SHORT_ANSWER_FILES[split] if (data / f).is_file()]
    return [*files, p.config.grader, str(p.config.max_new_tokens)]


@dataclass
class Session:
    """The loaded state of one run: the scoring backend and per-split caches."""

    prepared: Prepared
    backend: Backend
    caches: dict[str, ResultCache]

    def evaluate(self, split: str, with_diversity: bool,
                 on_batch: OnBatch | None = None,
                 on_start: Callable[[float], None] | None = None) -> Evaluate:
        """Evaluate `split` at a lambda; `on_start(lam)` before it is generated, `on_batch(n)`
        after each batch of n short answers."""
        n_bins = self.prepared.config.n_bins

        def run(lam: float) -> Evaluation:
            if on_start is not None:
                on_start(lam)
            self.backend.set(lam)
            scores = self.backend.multiple_choice(split)
            div = self.backend.diversity() if with_diversity else None
            short = self.backend.short_answers(split, on_batch)
            return Evaluation(
                point_metrics(scores, n_bins), scores, div,
                free_form_metrics(short, n_bins) if short is not None else None, short,
            )

        return run

    def at(self, split: str, lam: float, on_batch: OnBatch | None = None) -> Point:
        """One (cached) evaluation of `split` at `lam`."""
        return sweep_points([lam], self.evaluate(split, False, on_batch), self.caches[split],
                            split)[0]

    def close(self) -> None:
        """Release the backend (stops the vLLM engine's processes)."""
        self.backend.close()


def load_session(p: Prepared, work: Path) -> Session:
    """Load the configured backend; caches under `work/sweep`."""
    backend = load_backend(p)
    caches = {s: ResultCache(work / "sweep", cache_key(p, s)) for s in p.items}
    return Session(p, backend, caches)
