"""deploy/kubernetes: every rendered object valid for Kubernetes (or its CRD), the autoscaling metric
served by the adapter, and the PrometheusRule generated from the plain rule files.

Offline: kustomizations rendered by tests/deploy/kustomize.py, core objects checked against the
Kubernetes OpenAPI schemas that kubernetes-validate ships, custom resources against the subsets of
their CRDs kept in tests/deploy/crd_schemas. No cluster is involved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from tests.deploy import k8s_invariants as inv
from tests.deploy.k8s_invariants import DEPLOYMENTS, KUBERNETES, objects_of
from tests.deploy.kustomize import load_documents
from tests.deploy.promql import GAUGES, rule_groups
from tests.helpers.scripts import load_script

SCHEMAS = Path(__file__).parent / "crd_schemas"
# The oldest release with the preStop sleep action on by default, and the newest kubernetes-validate
# 1.37 has schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
CRD_SCHEMA_FILES = {
    "ServiceMonitor": "servicemonitor.yaml",
    "PodMonitor": "podmonitor.yaml",
    "PrometheusRule": "prometheusrule.yaml",
    "InferenceService": "inferenceservice.yaml",
}


def _load_k8s_rules_script():
    return load_script("k8s_rules")


@functools.cache
def crd_validator(schema_file: str) -> jsonschema.Draft202012Validator:
    common = yaml.safe_load((SCHEMAS / "_common.yaml").read_text(encoding="utf-8"))
    registry = referencing.Registry().with_resource(common["$id"], referencing.Resource.from_contents(common))
    schema = yaml.safe_load((SCHEMAS / schema_file).read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(manifest: dict, version: str) -> None:
    """Core kinds: the Kubernetes schema, strictly (unknown fields refused). Custom resources: their
    CRD subset; an InferenceService's predictor also as the core/v1 PodSpec KServe inlines there."""
    if manifest["kind"] in CRD_SCHEMA_FILES:
        crd_validator(CRD_SCHEMA_FILES[manifest["kind"]]).validate(manifest)
        if manifest["kind"] == "InferenceService":
            extension = {"minReplicas", "maxReplicas", "labels", "annotations"}
            pod = {key: value for key, value in manifest["spec"]["predictor"].items() if key not in extension}
            validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod}, version)
        return
    kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", DEPLOYMENTS)
def test_every_object_is_valid(kustomization: str, version: str) -> None:
    objects = objects_of(kustomization)
    kinds = {manifest["kind"] for manifest in objects}
    assert {"ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "PrometheusRule", "HorizontalPodAutoscaler"} <= kinds
    for manifest in objects:
        validate(manifest, version)


def test_the_api_key_secret_example_is_valid_and_is_what_the_pods_read() -> None:
    (secret,) = load_documents(KUBERNETES / "api-keys.secret.example.yaml")
    kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[0], strict=True)
    for kustomization in DEPLOYMENTS:
        assert "Secret" not in {manifest["kind"] for manifest in objects_of(kustomization)}  # never reset by apply
        for server in inv.servers(objects_of(kustomization)):
            (reference,) = [
                e["valueFrom"]["secretKeyRef"] for e in server.container["env"] if e["name"] == "MIXOE_API_KEYS"
            ]
            assert reference["name"] == secret["metadata"]["name"]
            assert reference["key"] in secret["stringData"]
            assert reference.get("optional") is not True  # no Secret, no pod: never silently unauthenticated


@pytest.mark.parametrize(
    ("manifest", "schema_file", "typo", "message"),
    [
        (
            "base/servicemonitor.yaml",
            "servicemonitor.yaml",
            lambda m: m["spec"]["endpoints"][0].update(intreval="15s"),
            "'intreval' was unexpected",
        ),
        (
            "kserve/podmonitor.yaml",
            "podmonitor.yaml",
            lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="15"),
            "'15' does not match",
        ),
        (
            "common/prometheusrule.yaml",
            "prometheusrule.yaml",
            lambda m: m["spec"]["groups"][0]["rules"][0].update(alert="X"),  # a rule both records and alerts
            "not valid under any of the given schemas",
        ),
        (
            "kserve/inferenceservice.yaml",
            "inferenceservice.yaml",
            lambda m: m["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "Raw"}),
            "'Raw' is not one of",
        ),
    ],
)
def test_crd_schemas_refuse_a_broken_resource(
    manifest: str, schema_file: str, typo: Callable[[dict], None], message: str
) -> None:
    (resource,) = load_documents(KUBERNETES / manifest)
    crd_validator(schema_file).validate(resource)
    typo(resource)
    with pytest.raises(jsonschema.ValidationError, match=message):
        crd_validator(schema_file).validate(resource)


def test_strict_kubernetes_validation_refuses_an_unknown_field() -> None:
    deployment = next(m for m in objects_of("overlays/gpu") if m["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_prometheus_adapter_serves_the_metric_the_autoscalers_use() -> None:
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text(encoding="utf-8"))
    crd_validator("prometheus-adapter-values.yaml").validate(values)
    (rule,) = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    assert series in GAUGES  # a gauge the service exports, not a counter needing rate()
    assert rule["name"]["as"] == inv.AUTOSCALING_METRIC
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod values for a Pods metric


def test_prometheus_rule_is_generated_from_the_rule_files() -> None:
    k8s_rules = _load_k8s_rules_script()
    assert (KUBERNETES / "common" / "prometheusrule.yaml").read_text(encoding="utf-8") == k8s_rules.render()
    (rule,) = load_documents(KUBERNETES / "common" / "prometheusrule.yaml")
    assert rule["spec"]["groups"] == rule_groups()


def test_prometheus_rule_check_fails_when_a_rule_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed manifest passes ``--check``; after a rule file changes it is stale (exit 1)."""
    k8s_rules = _load_k8s_rules_script()
    assert k8s_rules.main(["--check"]) == 0
    rules_dir, manifest = tmp_path / "rules", tmp_path / "prometheusrule.yaml"
    rules_dir.mkdir()
    edited = 0
    for path in sorted(k8s_rules.RULES_DIR.glob("*.yml")):
        text = path.read_text(encoding="utf-8")
        edited += text.count("for: 15m")
        (rules_dir / path.name).write_text(text.replace("for: 15m", "for: 20m"), encoding="utf-8")
    assert edited > 0
    manifest.write_text(k8s_rules.MANIFEST.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(k8s_rules, "RULES_DIR", rules_dir)
    monkeypatch.setattr(k8s_rules, "MANIFEST", manifest)
    assert k8s_rules.main(["--check"]) == 1
    assert k8s_rules.main([]) == 0  # rewrites it
    assert k8s_rules.main(["--check"]) == 0
    assert "for: 20m" in manifest.read_text(encoding="utf-8")
