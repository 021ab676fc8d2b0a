"""What scores one lambda: the transformers reference or the vLLM engine, behind one interface.

A `Backend` sets the weights to a lambda and scores a split's multiple-choice items, its short
answers and the diversity of sampled replies to open prompts. Both backends tokenize with the
same evaluators (`MCEvaluator`, `FreeFormEvaluator`, `DiversityProbe`) and score with their
functions; they differ in who computes the logprobs and samples: transformers in this process
holding three copies of the weights (merge/model.py), or the vLLM engine that will serve the
merge (merge/engine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from calibserve.merge.diversity import DiversityProbe
from calibserve.merge.evaluate import MCEvaluator, Scores
from calibserve.merge.freeform import FreeFormEvaluator, FreeFormScores, stop_token_ids
from calibserve.merge.prepare import Prepared

__all__ = ["Backend", "OnBatch", "TransformersBackend", "VllmBackend", "load_backend"]

# Told how many short answers were just generated (the progress display).
OnBatch = Callable[[int], None]


class Backend(Protocol):
    """Sets the weights to a lambda, then scores the current weights."""

    def set(self, lam: float) -> None: ...

    def multiple_choice(self, split: str) -> Scores: ...

    def short_answers(self, split: str, on_batch: OnBatch | None) -> FreeFormScores | None: ...

    def diversity(self) -> dict[str, float] | None: ...

    def close(self) -> None: ...


@dataclass
class _Evaluators:
    """The tokenized splits both backends score."""

    mc: dict[str, MCEvaluator]
    free_form: dict[str, FreeFormEvaluator]


def _evaluators(p: Prepared, tok: Any) -> _Evaluators:
    from calibserve.calibration.grading import load_grader

    c = p.config
    stops = stop_token_ids(tok, p.plan.aligned.path)
    return _Evaluators(
        {s: MCEvaluator(tok, items, c.batch_size, c.device) for s, items in p.items.items()},
        {s: FreeFormEvaluator(tok, items, load_grader(c.grader), stop_ids=stops,
                              batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                              device=c.device)
         for s, items in p.short_items.items() if items},
    )


def _probe(p: Prepared, tok: Any) -> DiversityProbe | None:
    """The open prompts' diversity probe, when `--diversity` asked for one."""
    c = p.config
    return DiversityProbe(tok, p.prompts, seed=c.seed, device=c.device) if p.prompts else None


class TransformersBackend:
    """The reference: one live transformers model plus both parents, in this process."""

    def __init__(self, p: Prepared, tok: Any) -> None:
        from calibserve.merge.model import load_eval_model, resolve_dtype

        c = p.config
        self.ev = _evaluators(p, tok)
        self.em = load_eval_model(p.plan, c.method, resolve_dtype(c.dtype, c.device), c.device)
        self.probe = _probe(p, tok)

    def set(self, lam: float) -> None:
        self.em.set(lam)

    def multiple_choice(self, split: str) -> Scores:
        return self.ev.mc[split].score(self.em.model)

    def short_answers(self, split: str, on_batch: OnBatch | None) -> FreeFormScores | None:
        ff = self.ev.free_form.get(split)
        return ff.score(self.em.model, on_batch) if ff is not None else None

    def diversity(self) -> dict[str, float] | None:
        return self.probe.measure(self.em.model) if self.probe is not None else None

    def close(self) -> None:
        pass


class VllmBackend:
    """The serving engine: weights set in place on every worker (merge/engine.py)."""

    def __init__(self, p: Prepared, tok: Any) -> None:
        from calibserve.merge.engine import (
            EngineSettings,
            VllmEvaluator,
            model_len_needed,
            on_cpu,
        )

        c = p.config
        self.ev = _evaluators(p, tok)
        self.probe = _probe(p, tok)
        prompts = [q for e in self.ev.mc.values() for q in e.prompts]
        prompts += [q for f in self.ev.free_form.values() for q in f.prompts]
        new_tokens = c.max_new_tokens
        if self.probe is not None:
            prompts += self.probe.inputs
            new_tokens = max(new_tokens, self.probe.max_new_tokens)
        settings = EngineSettings(
            dtype=c.dtype if c.dtype != "auto" else ("float32" if on_cpu() else "bfloat16"),
            tensor_parallel_size=c.tensor_parallel_size,
            pipeline_parallel_size=c.pipeline_parallel_size,
            distributed_executor_backend=c.distributed_executor_backend,
            max_model_len=model_len_needed(prompts, new_tokens),
            gpu_memory_utilization=c.gpu_memory_utilization,
            seed=c.seed,
        )
        self.engine = VllmEvaluator(p.plan.base.path, p.plan.aligned.path, c.method, settings)

    def set(self, lam: float) -> None:
        self.engine.set(lam)

    def multiple_choice(self, split: str) -> Scores:
        return self.engine.multiple_choice(self.ev.mc[split])

    def short_answers(self, split: str, on_batch: OnBatch | None) -> FreeFormScores | None:
        ff = self.ev.free_form.get(split)
        return self.engine.short_answers(ff, on_batch) if ff is not None else None

    def diversity(self) -> dict[str, float] | None:
        return self.engine.diversity(self.probe) if self.probe is not None else None

    def close(self) -> None:
        self.engine.close()


def load_backend(p: Prepared) -> Backend:
    """The configured evaluator, loaded (the aligned tokenizer, the parents or the engine)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p.plan.aligned.path)
    if p.config.evaluator == "vllm":
        return VllmBackend(p, tok)
    return TransformersBackend(p, tok)
