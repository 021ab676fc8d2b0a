"""One import namespace: the wheel installs `calibserve` and nothing else (issue 15)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ["calibration", "merge", "server", "routing", "demo", "tune", "fit"]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run outside the repo: the repo root on sys.path would make its folders importable by name.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_the_folders_import_only_under_calibserve(name: str, tmp_path: Path) -> None:
    assert _python(f"import calibserve.{name}", tmp_path).returncode == 0
    failed = _python(f"import {name}", tmp_path)
    assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def test_a_users_own_server_module_does_not_shadow_ours(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "__init__.py").write_text("raise SystemExit('user demo imported')\n")
    done = _python("import calibserve.server.config, calibserve.demo.settings", tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_the_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("calibserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["calibserve"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"calibserve"}
    for name in SUBPACKAGES:
        assert f"calibserve/{name}/__init__.py" in names
    assert "calibserve/py.typed" in names
