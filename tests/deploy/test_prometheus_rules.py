"""deploy/prometheus: promtool checks, unit tests, and that their expected values are right."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibserve.calibration import N_BINS, ece
from calibserve.testing.fixtures import require
from tests.deploy.tools import K8S, RULE_TESTS, RULES, run, tool


def promtool() -> str:
    path = tool("promtool")
    require(path is not None, "promtool not found (Debian package `prometheus`)")
    assert path is not None
    return path


def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def test_rules_pass_promtool_check() -> None:
    result = run([promtool(), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass() -> None:
    assert len(RULE_TESTS) >= 2
    result = run([promtool(), "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_unit_tests_catch_per_replica_ece(tmp_path: Path) -> None:
    """Negative control: keeping `instance` apart inside the bins (per-replica |conf - correct|)
    is the classic mistake; the unit tests must reject a rules file that makes it."""
    text = RULES.read_text()
    broken = re.sub(r"sum by \(model, method, bin\)(\s*)\(increase\(",
                    r"sum by (model, method, bin, instance)\1(increase(", text)
    assert broken != text
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules.yml").write_text(broken)
    test_file = tmp_path / "tests" / "calibration_test.yml"
    shutil.copy(RULES.parent / "tests" / "calibration_test.yml", test_file)
    result = run([promtool(), "test", "rules", str(test_file)])
    assert result.returncode != 0
    # promtool reports failures on stderr; 0.375 is the per-replica value the test file derives.
    assert "3.75E-01" in result.stdout + result.stderr


def test_unit_test_expectation_is_calibration_ece() -> None:
    """The 0.325 in calibration_test.yml is the ECE of the feedback its series encode, as
    calibration/ computes it (one minute of feedback, repeated 60 times)."""
    per_minute = [
        (0.875, 1), (0.875, 0),          # replica a, bin 13
        (0.875, 1),                      # replica b, bin 13
        (0.5, 1), (0.5, 1),              # replica b, bin 7
    ]
    conf = np.array([c for c, _ in per_minute] * 60)
    correct = np.array([y for _, y in per_minute] * 60)
    expected = ece(conf, correct, n_bins=N_BINS)
    text = (RULES.parent / "tests" / "calibration_test.yml").read_text()
    stated = re.search(
        r"model:calibserve_calibration_ece:1h\{method=\"answer\",model=\"m\"\}'\n\s+value: "
        r"([0-9.]+)", text
    )
    assert stated is not None
    assert float(stated.group(1)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.325)


def test_every_rule_and_alert_is_unit_tested() -> None:
    tested = "\n".join(p.read_text() for p in RULE_TESTS)
    for group in rules()["groups"]:
        for rule in group["rules"]:
            name = rule.get("record") or rule["alert"]
            if name == "model:calibserve_feedback_accepted:increase6h":
                continue  # exercised through CalibserveNoFeedback, which is tested
            assert name in tested, f"{name} has no promtool unit test"


def test_ece_rules_aggregate_bins_before_abs() -> None:
    for group in rules()["groups"]:
        for rule in group["rules"]:
            if rule.get("record", "").startswith("model:calibserve_calibration_ece:"):
                expr = " ".join(rule["expr"].split())
                # per (model, method): option-letter and free-form ECE are never mixed
                assert "abs( sum by (model, method, bin) (increase(" \
                    "calibserve_calibration_confidence_sum" in expr
                assert "- sum by (model, method, bin) (increase(" \
                    "calibserve_calibration_correct_total" in expr
                assert expr.startswith("sum by (model, method) (")


def test_prometheusrule_is_rendered_from_rules_file() -> None:
    """deploy/k8s/prometheusrule.yaml carries exactly the groups of rules.yml, and is what
    render_prometheusrule.py writes today (so nobody edited one without the other)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", K8S / "render_prometheusrule.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    committed = (K8S / "prometheusrule.yaml").read_text()
    assert committed == render.render(RULES.read_text()), (
        "prometheusrule.yaml is stale: run python deploy/k8s/render_prometheusrule.py"
    )
    doc = yaml.safe_load(committed)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["spec"] == rules()


def test_prometheusrule_spec_passes_promtool(tmp_path: Path) -> None:
    spec = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())["spec"]
    path = tmp_path / "spec.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """prometheus.yml names its rule file by its in-container path; check it with the real one."""
    config = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run([promtool(), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    n_rules = sum(len(group["rules"]) for group in rules()["groups"])
    assert f"SUCCESS: {n_rules} rules found" in result.stdout
