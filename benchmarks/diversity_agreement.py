"""Diversity as the two evaluators sample it: transformers' `generate` against vLLM's sampler.

    .venv/bin/python benchmarks/diversity_agreement.py [--model DIR] [--seeds 6]
        [--json benchmarks/results/diversity_agreement.json]

The merge's diversity probe (`merge.diversity.DiversityProbe`: 4 replies per open prompt at
temperature 1, 24 tokens) on one checkpoint (default: the demo world's aligned model, built if
missing), `--seeds` seeds with each sampler. The samplers draw different random numbers, so the
figure is the spread of each over seeds, which should overlap (issue 28: `--diversity` on the
vLLM evaluator). Prints one line per seed and sampler and writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: benchmarks/ itself is sys.path[0]
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine, utc_now, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="Default: the demo aligned model.")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="Open prompts JSONL. Default: the demo world's open_prompts.jsonl.")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.model is None or args.prompts is None:
        from calibserve.demo import build_world

        world = Path(build_world())
        args.model = args.model or world / "aligned"
        args.prompts = args.prompts or world / "data" / "open_prompts.jsonl"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibserve.merge.diversity import DiversityProbe, load_open_prompts
    from calibserve.merge.engine import EngineSettings, VllmEvaluator, model_len_needed

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = load_open_prompts(args.prompts)
    probes = [DiversityProbe(tok, prompts, seed=s) for s in range(args.seeds)]
    rows: list[dict[str, Any]] = []
    model = AutoModelForCausalLM.from_pretrained(args.model)
    for p in probes:
        rows.append({"sampler": "transformers", "seed": p.seed, **p.measure(model)})
        print(rows[-1], flush=True)
    del model
    # The vLLM evaluator on a "pair" of the model with itself: every lambda is the model.
    engine = VllmEvaluator(args.model, args.model, "linear", EngineSettings(
        max_model_len=model_len_needed(probes[0].inputs, probes[0].max_new_tokens)))
    try:
        engine.set(1.0)
        for p in probes:
            rows.append({"sampler": "vllm", "seed": p.seed, **engine.diversity(p)})
            print(rows[-1], flush=True)
    finally:
        engine.close()
    spread: dict[str, dict[str, list[float]]] = {}
    for sampler in ("transformers", "vllm"):
        mine = [r for r in rows if r["sampler"] == sampler]
        spread[sampler] = {key: [min(r[key] for r in mine), max(r[key] for r in mine)]
                           for key in ("distinct_1", "distinct_2", "pairwise_jaccard")}
    print(spread)
    if args.json is not None:
        write_json(args.json, {"model": str(args.model), "prompts": len(prompts),
                               "machine": machine(), "date": utc_now(), "rows": rows,
                               "spread": spread}, indent=1)


if __name__ == "__main__":
    main()
