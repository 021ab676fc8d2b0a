"""The vLLM evaluator: the sweep scored inside the engine (and kernels) that will serve the merge.

One `vllm.LLM` is started on the aligned checkpoint with `engine_worker.InterpolationExtension`
mixed into its workers; `set(lam)` sets every worker's weights to theta(lam) in place through
`collective_rpc` (see engine_worker.py for how and why). Items are tokenized once by the
reference evaluators (`MCEvaluator`, `FreeFormEvaluator`: the same chat template and tokens) and
sent to the engine as token ids, and their scoring functions turn the engine's logprobs into
`Scores` / `FreeFormScores`, so the two evaluators differ only in who computes the logprobs:

- multiple choice: one greedy token with the first token's top `SERVED_TOP_K` temperature-1
  logprobs, as the server asks for them, so a letter token outside them is absent as it is
  there (an item with no letter among them, which the server scores by another method, is
  read from every letter token instead); scored by `calibration.answer_confidence`
  (`MCEvaluator.score_logprobs`). (The
  reference reads every letter token's logprob; `letter_logprobs` gives the same here, for
  checks. On Gemma 3, with two tokens a letter, 3 of 100 items had one outside the top 5 and
  were served up to 6.8e-3 more confident than full-vocabulary scoring says.)
- short answers: greedy replies of at most `max_new_tokens` with each token's logprob, stopping
  where the server's engine stops, scored by `confidence_score(..., "mean")` and the merge's
  grader (`FreeFormEvaluator.score_replies`);
- diversity (`--diversity`): `samples` replies per open prompt sampled at temperature 1 by the
  engine's sampler, seeded per prompt, scored by `merge.diversity.score`.

Prefix caching is off: a cached prefix computed under one lambda must never serve another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibserve.calibration.methods import confidence_method
from calibserve.merge.diversity import DiversityProbe
from calibserve.merge.diversity import score as score_diversity
from calibserve.merge.errors import IncompatibleCheckpoints, InvalidConfig, MergeError
from calibserve.merge.evaluate import MCEvaluator, Scores
from calibserve.merge.freeform import FreeFormEvaluator, FreeFormScores

__all__ = ["EngineSettings", "WeightUpdateError", "VllmEvaluator", "EXTENSION"]

EXTENSION = "calibserve.merge.engine_worker.InterpolationExtension"
# The first token's alternatives the server asks for when it scores option letters.
SERVED_TOP_K = confidence_method("answer").top_logprobs
# vLLM's bound on `SamplingParams.logprob_token_ids` (MAX_LOGPROB_TOKEN_IDS in 0.32).
MAX_LETTER_TOKENS = 128
# On CPU, vLLM's KV cache is sized by this variable (GiB), not by memory utilisation.
CPU_KV_CACHE_GIB = "1"
GPU_MEMORY_UTILIZATION = 0.9
CPU_MEMORY_UTILIZATION = 0.3


class WeightUpdateError(MergeError):
    """An in-place update did not set every weight the plan interpolates."""


@dataclass(frozen=True)
class EngineSettings:
    """What the evaluator's engine is started with."""

    dtype: str = "float32"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's choice
    max_model_len: int = 256
    gpu_memory_utilization: float | None = None  # None: 0.9 on a GPU, 0.3 on CPU
    seed: int = 0
    enforce_eager: bool = True

    @property
    def world_size(self) -> int:
        """Worker processes (ranks): tensor-parallel size x pipeline stages."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def check_backend(backend: str | None) -> None:
    """Refuse an executor backend that cannot start here (Ray not installed), naming the flag."""
    import importlib.util

    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise InvalidConfig("the ray backend needs Ray on every node (pip install "
                            "'ray[default]', then `ray start` on each)",
                            "--distributed-executor-backend")


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (no GPU that torch sees)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch comes with vllm
        return True


def cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's cores in `ranks`
    contiguous groups ("0|1" for two ranks on two cores); refused when there are fewer cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if len(cores) < ranks:
        raise InvalidConfig(f"{ranks} CPU ranks need at least {ranks} cores; this process has "
                            f"{len(cores)}", "--tensor-parallel-size")
    size = len(cores) // ranks
    groups = [cores[i * size:(i + 1) * size] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


class VllmEvaluator:
    """A vLLM engine over the aligned checkpoint whose weights are set to any lambda."""

    def __init__(self, base: Path, aligned: Path, method: str, settings: EngineSettings) -> None:
        check_backend(settings.distributed_executor_backend)
        from vllm import LLM

        if on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
            if settings.world_size > 1:
                # vLLM binds each CPU rank to a NUMA node and refuses more ranks than nodes
                # (one node here); splitting this process's cores among the ranks works.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                      cpu_binding(settings.world_size))
        self.settings = settings
        try:
            self.llm = LLM(
                model=str(aligned),
                tokenizer=str(aligned),
                dtype=settings.dtype,  # type: ignore[arg-type]  # checked by MergeConfig
                tensor_parallel_size=settings.tensor_parallel_size,
                pipeline_parallel_size=settings.pipeline_parallel_size,
                distributed_executor_backend=settings.distributed_executor_backend,
                max_model_len=settings.max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization
                or (CPU_MEMORY_UTILIZATION if on_cpu() else GPU_MEMORY_UTILIZATION),
                enforce_eager=settings.enforce_eager,
                enable_prefix_caching=False,
                seed=settings.seed,
                worker_extension_cls=EXTENSION,
            )
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidConfig(f"vLLM could not start on {aligned}: {first}",
                                "--evaluator") from exc
        self.current: float | None = None
        # What each rank fed its loader at the current lambda (name -> fingerprint).
        self.fed: dict[str, tuple[float, float]] = {}
        self.fed_by_rank: list[dict[str, tuple[float, float]]] = []
        self.open_pair(base, aligned, method)

    def open_pair(self, base: Path, aligned: Path, method: str) -> None:
        """Every worker plans (base, aligned) interpolated by `method`; no lambda is set yet.
        The engine keeps the aligned architecture it was started with."""
        self.llm.collective_rpc("calibserve_open_pair", args=(str(base), str(aligned), method))
        self.current = None

    @property
    def ranks(self) -> int:
        return self.settings.world_size

    def set(self, lam: float) -> None:
        """Every worker's weights to theta(lam); raises `WeightUpdateError` when a worker's
        loader left a parameter unset."""
        if self.current == lam:
            return
        self.current = None
        results = self.llm.collective_rpc("calibserve_set_lambda", args=(float(lam),))
        for rank, res in enumerate(results):
            if res["not_loaded"]:
                raise WeightUpdateError(
                    f"the in-place update at lambda {lam:g} left {len(res['not_loaded'])} "
                    f"parameter(s) of rank {rank} unset: {', '.join(res['not_loaded'][:6])}",
                    "--evaluator")
        names = {frozenset(res["fed"]) for res in results}
        if len(names) != 1:
            raise WeightUpdateError(f"the ranks fed different tensors at lambda {lam:g}",
                                    "--evaluator")
        self.fed_by_rank = [dict(res["fed"]) for res in results]
        self.fed = self.fed_by_rank[0]
        self.current = lam

    def letter_logprobs(self, mc: MCEvaluator, rows: Sequence[int] | None = None
                        ) -> NDArray[np.float64]:
        """(n_items, n_columns) first-token logprobs of every option-letter token, temperature
        1, as the reference reads them (`rows`: only those items, in that order)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(mc.columns) > MAX_LETTER_TOKENS:
            raise IncompatibleCheckpoints(
                f"the tokenizer has {len(mc.columns)} option-letter tokens; vLLM returns the "
                f"logprobs of at most {MAX_LETTER_TOKENS}", "--evaluator")
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=mc.columns,
                                detokenize=False)
        which = range(len(mc.prompts)) if rows is None else rows
        prompts = [TokensPrompt(prompt_token_ids=mc.prompts[i]) for i in which]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        lps = np.full((len(prompts), len(mc.columns)), -math.inf)
        for i, out in enumerate(outs):
            steps: Any = out.outputs[0].logprobs
            first = steps[0]
            for k, tok in enumerate(mc.columns):
                if tok in first:
                    lps[i, k] = float(first[tok].logprob)
        return lps

    def served_letter_logprobs(self, mc: MCEvaluator) -> NDArray[np.float64]:
        """The option-letter logprobs the server sees: its request asks for the first token's
        `SERVED_TOP_K` alternatives (what the `answer` method reads), so a letter token outside
        them is absent there (-inf here) and the options renormalise without it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=SERVED_TOP_K,
                                detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in mc.prompts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        lps = np.full((len(mc.prompts), len(mc.columns)), -math.inf)
        for i, out in enumerate(outs):
            steps: Any = out.outputs[0].logprobs
            for k, tok in enumerate(mc.columns):
                if tok in steps[0]:
                    lps[i, k] = float(steps[0][tok].logprob)
        # No letter at all among them: the server scores such a reply by another method
        # (`no_letter`), so no served number exists to match; every letter token's logprob is
        # read instead, as the reference reads it. (Scoring those as "no answer", confidence 0,
        # gave Gemma 3's base, which never starts a chat reply with a letter, accuracy 0 at
        # ECE 0: the best point for min-ece.)
        silent = [i for i in range(len(outs)) if not np.isfinite(lps[i]).any()]
        if silent:
            lps[silent] = self.letter_logprobs(mc, silent)
        return lps

    def multiple_choice(self, mc: MCEvaluator) -> Scores:
        """Scored from what the server sees (`served_letter_logprobs`), by the reference's
        scoring function."""
        return mc.score_logprobs(self.served_letter_logprobs(mc))

    def generate(
        self, ff: FreeFormEvaluator, on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy replies (the stop token included when reached) and each token's
        temperature-1 logprob, in item order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=ff.max_new_tokens, temperature=0.0, logprobs=0,
                                stop_token_ids=list(ff.stop_ids), detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in ff.prompts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            tokens.append(ids)
            steps = o.logprobs or []
            logprobs.append([float(step[t].logprob)  # type: ignore[index]
                             for t, step in zip(ids, steps, strict=True)])
        if on_batch is not None:
            on_batch(len(outs))
        return tokens, logprobs

    def short_answers(
        self, ff: FreeFormEvaluator, on_batch: Callable[[int], None] | None = None
    ) -> FreeFormScores:
        tokens, logprobs = self.generate(ff, on_batch)
        return ff.score_replies(tokens, logprobs)

    def diversity(self, probe: DiversityProbe) -> dict[str, float]:
        """The probe's measure through the engine's sampler: `probe.samples` replies per
        prompt at temperature 1 (no top-k or top-p), seeded per prompt from `probe.seed`,
        decoded as the probe decodes them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in probe.inputs],
            [SamplingParams(n=probe.samples, temperature=1.0, top_p=1.0, top_k=0,
                            max_tokens=probe.max_new_tokens, seed=probe.seed + i,
                            detokenize=False)
             for i in range(len(probe.inputs))],
            use_tqdm=False)
        return score_diversity(
            [probe.tokenizer.batch_decode([list(o.token_ids) for o in out.outputs],
                                          skip_special_tokens=True) for out in outs])

    def inject_fault(self, name: str | None) -> None:
        """Tests only: make every worker feed the aligned tensor for `name` at any lambda."""
        self.llm.collective_rpc("calibserve_inject_fault", args=(name,))
        self.current = None

    def close(self) -> None:
        """Stop the engine and its worker processes."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm


def model_len_needed(prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
    """The engine's max_model_len: the longest prompt plus its reply, rounded up to 64."""
    longest = max((len(p) for p in prompts), default=1) + new_tokens
    return int(math.ceil(longest / 64) * 64)
