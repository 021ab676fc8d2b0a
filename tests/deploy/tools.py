"""Paths and external tools the deploy tests share (promtool, hadolint, docker compose, ...)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "calibserve.json"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """An executable on PATH or next to this interpreter (pip-installed tools in the venv)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = VENV_BIN / name
    return str(candidate) if candidate.is_file() else None


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or a standalone v2+ `docker-compose` binary."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = tool("docker-compose")
    if standalone:
        out = run([standalone, "version"]).stdout
        # Compose v1 (the Python one) reads the file with older rules; only v2+ is the reference.
        match = re.search(r"v?(\d+)\.\d+", out)
        if match and int(match.group(1)) >= 2:
            return [standalone]
    return None


# --- PromQL metric names -------------------------------------------------------------------------

_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "Inf", "NaN"}
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names a PromQL expression selects.

    Strips what can hold identifiers that are not metric names: strings, label matchers, range
    and subquery brackets, `by (...)`-style label lists, offsets, Grafana variables, function
    calls (an identifier followed by `(`) and keywords.
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _LABEL_LISTS.sub(" ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    return {m.group(1) for m in _IDENT.finditer(s)} - _KEYWORDS
