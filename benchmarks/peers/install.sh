#!/usr/bin/env bash
# Installs the peers benchmarks/proxy_overhead.py measures calibserve against, into .peers/
# (git-ignored) at the repo root. Idempotent: a peer already at its pinned version is left alone.
#
#   .peers/litellm   a venv with litellm[proxy]==LITELLM_VERSION, plus httptools and uvloop
#                    (LiteLLM's production docs: uvicorn picks them up when they are installed)
#   .peers/portkey   npm install @portkey-ai/gateway@PORTKEY_VERSION
#   nginx            from Debian (nginx-light, else nginx) when root and missing; else skipped
#
# Quiet: one line per peer; everything the installers print goes to .peers/install.log.
#
#   bash benchmarks/peers/install.sh        (PYTHON=python3.11 to choose LiteLLM's interpreter)
set -euo pipefail

# The newest whose [proxy] extra resolves from the registry here (1.108+ pin litellm-proxy-extras
# versions that are not published there).
LITELLM_VERSION=1.106.12
PORTKEY_VERSION=1.15.2
# As shipped (dependencies as npm resolves them). Its streamed chat answers are 500s here
# ("TypeError: immutable" in updateHeaders, Node 20); pinning @hono/node-server to 1.14.2, the
# workaround in Portkey-AI/gateway issue 1389, did not change that (nor did gateway 1.9.8), so
# nothing is overridden.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$REPO/.peers"
LOG="$PEERS/install.log"
mkdir -p "$PEERS"
: >"$LOG"
echo "peers: installing into $PEERS (log: $LOG)"

fail() { echo "peers: $1 failed; the last lines of $LOG:" >&2; tail -n 20 "$LOG" >&2; exit 1; }

# -- LiteLLM --------------------------------------------------------------------------------
LL="$PEERS/litellm"
if [ -x "$LL/bin/python" ] && "$LL/bin/python" -c "
import importlib.metadata as m, sys
import httptools, uvloop
sys.exit(m.version('litellm') != '$LITELLM_VERSION')" >>"$LOG" 2>&1 && [ -x "$LL/bin/litellm" ]; then
    echo "peers: litellm $LITELLM_VERSION already installed"
else
    echo "peers: installing litellm[proxy]==$LITELLM_VERSION (a few minutes)"
    {
        rm -rf "$LL"
        "${PYTHON:-python3}" -m venv "$LL"
        "$LL/bin/python" -m pip install -q --upgrade pip
        "$LL/bin/python" -m pip install -q "litellm[proxy]==$LITELLM_VERSION" httptools uvloop
    } >>"$LOG" 2>&1 || fail "litellm"
    [ -x "$LL/bin/litellm" ] || fail "litellm (no bin/litellm)"
fi

# -- Portkey's gateway ---------------------------------------------------------------------
PK="$PEERS/portkey"
PKG="$PK/node_modules/@portkey-ai/gateway"
if ! command -v npm >/dev/null 2>&1; then
    echo "peers: npm not found: Portkey's gateway skipped"
elif [ -f "$PKG/build/start-server.js" ] && [ "$(node -p "require('$PKG/package.json').version" \
        2>>"$LOG")" = "$PORTKEY_VERSION" ]; then
    echo "peers: portkey gateway $PORTKEY_VERSION already installed"
else
    echo "peers: installing @portkey-ai/gateway@$PORTKEY_VERSION"
    mkdir -p "$PK"
    cat >"$PK/package.json" <<JSON
{
  "name": "calibserve-peers-portkey",
  "private": true,
  "dependencies": {"@portkey-ai/gateway": "$PORTKEY_VERSION"}
}
JSON
    rm -rf "$PK/node_modules" "$PK/package-lock.json"
    (cd "$PK" && npm install --no-audit --no-fund --loglevel=error) >>"$LOG" 2>&1 \
        || fail "portkey"
    [ -f "$PKG/build/start-server.js" ] || fail "portkey (no build/start-server.js)"
fi

# -- nginx (the floor: a plain reverse proxy) ------------------------------------------------
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    echo "peers: nginx already installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "peers: installing nginx from Debian"
    {
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx
    } >>"$LOG" 2>&1 || fail "nginx"
    # The package may start a system nginx on port 80; the benchmark runs its own.
    { service nginx stop || true; } >>"$LOG" 2>&1
else
    echo "peers: nginx missing and not root (or no apt-get): nginx skipped"
fi
echo "peers: done"
