"""What the demo's expert costs to train, before and after the long tail (demo world version 8).

    .venv/bin/python benchmarks/demo_expert_cost.py BEFORE_WORLD AFTER_WORLD [--steps 150]

BEFORE_WORLD is a world built with `long_tail_fraction` 0 (version 7's recipe), AFTER_WORLD one
of the default settings. For each, from that world's built base, the script runs the start of
the expert's training exactly as the build does (continued pretraining on the whole corpus, then
one SFT epoch), alternating the two recipes `--rounds` times, and measures this process's CPU
seconds per step (one torch thread, as the build): CPU time, unlike wall time, hardly moves when
other work shares the machine. The expert's full cost is extrapolated from the build's step
counts. Prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from calibserve.demo.build import _torch_state, make_materials
from calibserve.demo.settings import DemoSettings
from calibserve.demo.train import pretrain, sft, sft_steps


def _settings_of(world: Path) -> tuple[DemoSettings, int]:
    report = json.loads((world / "world.json").read_text())
    return DemoSettings.model_validate(report["settings"]), int(report["seed"])


def measure(world: Path, steps: int) -> dict[str, Any]:
    """CPU seconds per continued-pretraining step and per SFT step of the expert of `world`."""
    settings, seed = _settings_of(world)
    mat = make_materials(settings, seed)
    base = LlamaForCausalLM.from_pretrained(world / "base")
    with _torch_state(settings.threads):
        gen = torch.Generator().manual_seed(seed)
        expert = copy.deepcopy(base)
        started = time.process_time()
        pretrain(expert, mat.doc_ids, mat.eos_id, settings.pretrain, gen, steps=steps)
        pretrain_s = time.process_time() - started
        one_epoch = settings.expert_sft.model_copy(update={"epochs": 1})
        started = time.process_time()
        sft(expert, mat.sft_ids, mat.pad_id, one_epoch, gen)
        sft_s = time.process_time() - started
    n_sft = sft_steps(len(mat.sft_ids), one_epoch)
    full = (settings.expert_extra_steps * pretrain_s / steps
            + sft_steps(len(mat.sft_ids), settings.expert_sft) * sft_s / n_sft)
    return {
        "world": world.name,
        "long_tail_fraction": settings.world.long_tail_fraction,
        "corpus_documents": len(mat.doc_ids),
        "base_corpus_documents": len(mat.base_doc_ids),
        "pretrain_cpu_ms_per_step": round(1000 * pretrain_s / steps, 1),
        "sft_cpu_ms_per_step": round(1000 * sft_s / n_sft, 1),
        "expert_cpu_s_extrapolated": round(full, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--steps", type=int, default=150, help="continued-pretraining steps timed")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    runs: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, world in (("before", args.before), ("after", args.after)):
            result = measure(world, args.steps)
            runs[label].append(result["expert_cpu_s_extrapolated"])
            print(json.dumps({"recipe": label, **result}), flush=True)
    print(json.dumps({"summary": "expert CPU seconds, extrapolated to the build's steps",
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
