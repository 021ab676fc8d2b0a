"""Every YAML file under deploy/ is yamllint-clean with deploy/.yamllint.yaml."""

from __future__ import annotations

from calibserve.testing.fixtures import require
from tests.deploy.tools import DEPLOY, run, tool


def test_deploy_yaml_is_lint_clean() -> None:
    yamllint = tool("yamllint")
    require(yamllint is not None, "yamllint not found (pip install yamllint)")
    assert yamllint is not None
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})
    assert len(files) >= 15
    result = run([yamllint, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr
