#!/usr/bin/env bash
# Seed 004 (calibration-aware fine-tuning, Xiao et al. 2025) on SmolLM2-135M-Instruct, an aligned
# model with no base here, one command on a CPU or a GPU (issue 26, item 5):
#   CALIBSERVE_HOME=DIR benchmarks/realworld/smollm2_seed004.sh
# Every step is skipped when its output exists, and an interrupted tune resumes from OUT.partial:
# 1. fetch SmolLM2-135M-Instruct and the world facts (cached, checksummed);
# 2. `calibserve tune` the aligned model on the world facts' training pool, which no eval split
#    shares: `--calibration-aware none` (models/SmolLM2-135M-Instruct-sft) and `rcft`
#    (models/SmolLM2-135M-Instruct-rcft). CFT is answer-only SFT with no calibration term and
#    `calibserve tune` always computes the loss on the reply only, so `--calibration-aware cft`
#    runs the same objective as `none` (tune/objective.py; on the Gemma pair the two checkpoints
#    were bit-identical): the -sft checkpoint is both seed 004's CFT and its control. 150 steps of
#    16 (about 35 minutes a run on 2 CPU cores);
# 3. the lettered held-out split (benchmarks.realworld.mc_check), the form RCFT's regulariser
#    trains on, for the three checkpoints: realworld/smollm2-mc-check.json;
# 4. the short-answer table through `calibserve serve` and the openai SDK on the held-out split
#    (benchmarks.realworld.remedy_table with the rows of realworld/smollm2-rows.yaml): the model
#    raw and with a calibrator fitted here, CFT raw and with its calibrator, RCFT:
#    realworld/smollm2-table/; then benchmarks.guarantee.real_route: SmolLM2 CFT with its
#    calibrator escalating to the Gemma pair's calibrated merge, a real and stronger expert (when
#    gemma_pair.sh has run).
# DEVICE, TUNE_ARGS (extra `calibserve tune` options, e.g. "--max-steps 0" for a whole epoch on a
# GPU) and TABLE_ARGS (default "--limit 600": the first 600 held-out items, as the Gemma table asks)
# adjust it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HOME_DIR=${CALIBSERVE_HOME:-.calibserve}
REALWORLD=$HOME_DIR/realworld
MODELS=$REALWORLD/models
DATA=$REALWORLD/data/world_facts
ALIGNED=$MODELS/SmolLM2-135M-Instruct
DEVICE=${DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

"$PY" -m benchmarks.realworld.fetch --only smollm2,world_facts
for mode in none rcft; do
  out=$ALIGNED-${mode/none/sft}
  [[ -f "$out/train_info.json" ]] \
    || "$PY" -m calibserve tune --model "$ALIGNED" --data "$DATA/train.jsonl" --out "$out" \
         --calibration-aware "$mode" --max-steps 150 --device "$DEVICE" ${TUNE_ARGS:-}
done
[[ -f "$REALWORLD/smollm2-mc-check.json" ]] \
  || "$PY" -m benchmarks.realworld.mc_check --data "$DATA" \
       --out "$REALWORLD/smollm2-mc-check.json" "$ALIGNED" "$ALIGNED"-{sft,rcft}
# The table's rows (paths relative to this file's directory, REALWORLD).
cat > "$REALWORLD/smollm2-rows.yaml" <<'EOF'
smollm2:
  label: SmolLM2-135M-Instruct, raw
  model: models/SmolLM2-135M-Instruct
  build: python -m benchmarks.realworld.fetch --only smollm2
smollm2-calibrated:
  label: SmolLM2-135M-Instruct + calibrator
  model: models/SmolLM2-135M-Instruct
  calibration: calibrated/SmolLM2-135M-Instruct/calibration.json
  fit: data/world_facts
  build: python -m benchmarks.realworld.fetch --only smollm2; the calibrator is fitted here
smollm2-cft:
  label: SmolLM2 CFT (seed 004) = one SFT pass on the pool
  model: models/SmolLM2-135M-Instruct-sft
  costs: [models/SmolLM2-135M-Instruct-sft/train_info.json]
  build: calibserve tune --calibration-aware none (benchmarks/realworld/smollm2_seed004.sh)
smollm2-cft-calibrated:
  label: SmolLM2 CFT + calibrator
  model: models/SmolLM2-135M-Instruct-sft
  calibration: calibrated/SmolLM2-135M-Instruct-sft/calibration.json
  fit: data/world_facts
  costs: [models/SmolLM2-135M-Instruct-sft/train_info.json]
  build: calibserve tune --calibration-aware none (benchmarks/realworld/smollm2_seed004.sh); the calibrator is fitted here
smollm2-rcft:
  label: SmolLM2 RCFT (seed 004)
  model: models/SmolLM2-135M-Instruct-rcft
  costs: [models/SmolLM2-135M-Instruct-rcft/train_info.json]
  build: calibserve tune --calibration-aware rcft (benchmarks/realworld/smollm2_seed004.sh)
EOF
"$PY" -m benchmarks.realworld.remedy_table --realworld "$REALWORLD" \
  --config "$REALWORLD/smollm2-rows.yaml" --rows smollm2,smollm2-calibrated,smollm2-cft,smollm2-cft-calibrated,smollm2-rcft \
  --out "$REALWORLD/smollm2-table" ${TABLE_ARGS:---limit 600}
# SmolLM2 CFT + its calibrator escalating to the Gemma pair's calibrated merge (issue 29 item 5).
if [[ -f "$REALWORLD/remedy-table/rows/merge-calibrated/answers.jsonl" ]]; then
  "$PY" -m benchmarks.guarantee.real_route --primary "$REALWORLD/smollm2-table:smollm2-cft-calibrated" \
    --expert "$REALWORLD/remedy-table:merge-calibrated" --items "$DATA/short_test.jsonl"
else
  echo "the Gemma pair's table is missing: run benchmarks/realworld/gemma_pair.sh for the route"
fi
