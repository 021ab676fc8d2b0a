#!/usr/bin/env bash
# Another commit's calibserve beside this checkout, for side-by-side benchmarks
# (proxy_overhead.py --baseline-python, proxy_cpu.py --baseline-python):
#
#   benchmarks/baseline_build.sh COMMIT [DIR]   # prints DIR (default /tmp/calibserve-COMMIT)
#
# DIR gets `git archive COMMIT` (no worktree, no .git) and its own venv whose site-packages chain
# to this checkout's .venv (a .pth line), so only calibserve itself differs: the baseline's code,
# installed editable (strict mode) without dependencies. Idempotent.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=${1:?usage: baseline_build.sh COMMIT [DIR]}
dir=${2:-/tmp/calibserve-$commit}
main_python=$repo/.venv/bin/python
[[ -x $main_python ]] || { echo "no $main_python: run make install first" >&2; exit 1; }
if [[ -x $dir/.venv/bin/calibserve ]]; then echo "$dir"; exit 0; fi
rm -rf "$dir" && mkdir -p "$dir"
git -C "$repo" archive "$commit" | tar -x -C "$dir"
python3 -m venv --without-pip "$dir/.venv"
site=$(ls -d "$dir"/.venv/lib/python3*/site-packages)
"$main_python" -c 'import site; print(site.getsitepackages()[0])' > "$site/_calibserve_deps.pth"
log=$dir/.venv/install.log
(cd "$dir" && "$main_python" -m pip --python .venv/bin/python install --no-deps \
  --no-build-isolation -e . --config-settings editable_mode=strict >"$log" 2>&1) \
  || { echo "install failed; see $log" >&2; exit 1; }
echo "$dir"
