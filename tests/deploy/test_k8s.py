"""deploy/k8s: schema validation with kubernetes-validate, plus the cross-references between
manifests that no schema can see (selectors, Secret and ConfigMap names, ports, probes).

kubernetes-validate has the core API schemas (Deployment, Service, HPA, PDB, Secret, ConfigMap,
PVC) and checks those strictly (unknown fields fail). It has no schemas for the Prometheus
operator's CRDs, so ServiceMonitor and PrometheusRule are checked structurally here instead:
apiVersion/kind/metadata, the ServiceMonitor's selector and port against the Services, and the
PrometheusRule's spec with promtool (tests/deploy/test_prometheus_rules.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calibserve.calibration import CalibrationDocument, Scorer
from calibserve.server.config import ServerSettings
from calibserve.testing.fixtures import require
from tests.deploy.tools import K8S, run, tool

CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
              "Secret", "ConfigMap", "PersistentVolumeClaim"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def docs() -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def validator() -> str:
    path = tool("kubernetes-validate")
    require(path is not None, "kubernetes-validate not found (pip install kubernetes-validate)")
    assert path is not None
    return path


def test_all_expected_resources_exist() -> None:
    kinds = {kind for kind, _ in docs()}
    assert kinds == CORE_KINDS | CRD_KINDS


def test_core_manifests_pass_strict_schema_validation() -> None:
    files = sorted(K8S.glob("*.yaml"))
    result = run([validator(), "--strict", *map(str, files)])
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    assert passed == sum(1 for kind, _ in docs() if kind in CORE_KINDS)


def test_schema_validation_rejects_a_broken_deployment(tmp_path: Path) -> None:
    """Negative control: the validator really reads our files (a typo'd field must fail)."""
    doc = yaml.safe_load((K8S / "proxy-deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = run([validator(), "--strict", str(bad)])
    assert result.returncode != 0


def container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_proxy_deployment_probes_secret_and_config() -> None:
    d = docs()
    proxy = d[("Deployment", "calibserve")]
    c = container(proxy)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["args"] == ["--config", "/etc/calibserve/config.yaml"]
    key = next(e for e in c["env"] if e["name"] == "CALIBSERVE_SIGNING_KEY")
    ref = key["valueFrom"]["secretKeyRef"]
    secret = d[("Secret", ref["name"])]
    assert ref["key"] in secret["stringData"]
    assert proxy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in proxy["spec"]["template"]["spec"]["volumes"]}
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in d


def test_configmap_holds_a_valid_server_config_and_calibration() -> None:
    data = docs()[("ConfigMap", "calibserve-config")]["data"]
    settings = ServerSettings.model_validate(yaml.safe_load(data["config.yaml"]))
    (model,) = settings.models
    assert not model.managed and model.upstreams == ["http://vllm:8000/v1"]
    assert str(model.calibration) == "/etc/calibserve/calibration.json"
    doc = CalibrationDocument.from_dict(json.loads(data["calibration.json"]))
    assert doc.version == 2 and not Scorer.from_document(doc).multiple_choice.calibrated
    # The engine serves under the name the proxy asks for.
    engine_args = container(docs()[("Deployment", "vllm")])["args"]
    assert f"--served-model-name={model.upstream_model}" in engine_args
    assert settings.port == 8000


def test_engine_requests_gpus_and_its_service_is_the_upstream() -> None:
    d = docs()
    engine = d[("Deployment", "vllm")]
    res = container(engine)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert container(engine)["image"].startswith("vllm/vllm-openai:v")
    svc = d[("Service", "vllm")]
    assert svc["spec"]["ports"][0]["port"] == 8000


@pytest.mark.parametrize("service,deployment", [("calibserve", "calibserve"), ("vllm", "vllm")])
def test_selectors_match(service: str, deployment: str) -> None:
    d = docs()
    dep = d[("Deployment", deployment)]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert d[("Service", service)]["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container(dep)["ports"]}
    assert d[("Service", service)]["spec"]["ports"][0]["targetPort"] in port_names


def test_hpa_pdb_and_servicemonitor_point_at_the_proxy() -> None:
    d = docs()
    proxy_labels = d[("Deployment", "calibserve")]["spec"]["template"]["metadata"]["labels"]
    hpa = d[("HorizontalPodAutoscaler", "calibserve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "calibserve"}
    assert hpa["minReplicas"] >= 2  # fleet ECE and feedback across replicas are the point
    pdb = d[("PodDisruptionBudget", "calibserve")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= proxy_labels.items()
    sm = d[("ServiceMonitor", "calibserve")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [name for (kind, name), doc in d.items() if kind == "Service"
                and sm["spec"]["selector"]["matchLabels"].items()
                <= doc["metadata"]["labels"].items()]
    assert "calibserve" in selected
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in d[("Service", "calibserve")]["spec"]["ports"]}


def test_example_secret_holds_no_real_key() -> None:
    secret = docs()[("Secret", "calibserve-signing-key")]
    assert secret["stringData"]["signing-key"].startswith("REPLACE")
