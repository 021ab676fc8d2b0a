#!/usr/bin/env bash
# The real pair's sweep on a GPU machine with both evaluators, in bfloat16, timed (issue 28):
#   benchmarks/gpu_sweep.sh            (one command; prints and writes the results)
# Needs: this repository with its venv installed for a GPU (`pip install -e '.[gpu]'`: vLLM's
# CUDA build) and the real pair as local directories, copied from a machine that fetched them
# (nothing is downloaded: no hub, no registry):
#   .calibserve/realworld/models/gemma-3-270m           (base)
#   .calibserve/realworld/models/gemma-3-270m-instruct  (aligned, `calibserve tune`)
#   .calibserve/realworld/data/world_facts              (select/calibrate/test + short_*.jsonl)
# What it runs (benchmarks/vllm_evaluator.py): `calibserve merge --dtype bfloat16 --device cuda`
# with --evaluator transformers, then --evaluator vllm (same grid and items, free-form
# selection as benchmarks/realworld/gemma_pair.sh, grader contains), each run's wall and sweep
# seconds and per-point agreement; then the vLLM run's checkpoint under `calibserve serve`, its
# held-out items through the openai SDK against the confidences the sweep recorded.
# GRID (default 0,0.25,0.5,0.75,1), MAX_ITEMS (default 300), TP (tensor-parallel size of the
# vLLM run, default 1; the transformers run is always one device) adjust it.
# Output: benchmarks/results/gpu_sweep-<date>.json, plus the merges under
# .calibserve/bench/vllm_evaluator/ (rerunning reuses complete merges).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REAL=.calibserve/realworld
for d in "$REAL/models/gemma-3-270m" "$REAL/models/gemma-3-270m-instruct" "$REAL/data/world_facts"; do
  [[ -d $d ]] || { echo "missing $d: copy it from a machine that fetched the real pair" >&2; exit 2; }
done
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no GPU that torch sees")'
"$PY" -c 'import vllm' || { echo "vLLM is not installed in $PY's environment" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=benchmarks/results/gpu_sweep-$(date -u +%Y%m%dT%H%M).json
"$PY" -m benchmarks.vllm_evaluator --pair gemma --dtype bfloat16 --device cuda \
  --grid "${GRID:-0,0.25,0.5,0.75,1}" --max-items "${MAX_ITEMS:-300}" \
  --select free-form:max-accuracy --grader contains --tp "${TP:-1}" --json "$OUT"
echo "results: $OUT"
