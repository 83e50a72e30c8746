"""deploy/kubernetes: every rendered object valid for Kubernetes (or its CRD), and the service's
invariants held by every way of deploying it (tests/deploy/k8s_invariants.py).

Offline: kustomizations rendered by tests/deploy/kustomize.py, core objects checked against the
Kubernetes OpenAPI schemas that kubernetes-validate ships, custom resources against the subsets of
their CRDs kept in tests/deploy/crd_schemas. No cluster is involved.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from tests.deploy import k8s_invariants as inv
from tests.deploy.kustomize import load_documents, render
from tests.deploy.promql import GAUGES, ROOT, alert_rules

KUBERNETES = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "crd_schemas"
# kustomization: GPUs per pod.
DEPLOYMENTS = {"overlays/gpu": 1, "overlays/cpu": 0, "kserve": 1}
# The oldest release with the preStop sleep action on by default, and the newest kubernetes-validate
# 1.37 has schemas for.
KUBERNETES_VERSIONS = ("1.30", "1.37")
CRD_SCHEMA_FILES = {
    "ServiceMonitor": "servicemonitor.yaml",
    "PodMonitor": "podmonitor.yaml",
    "PrometheusRule": "prometheusrule.yaml",
    "InferenceService": "inferenceservice.yaml",
}


@functools.cache
def rendered(kustomization: str) -> tuple[dict, ...]:
    return tuple(render(KUBERNETES / kustomization))


def objects_of(kustomization: str) -> list[dict]:
    return copy.deepcopy(list(rendered(kustomization)))


def _load_k8s_rules_script():
    spec = importlib.util.spec_from_file_location("k8s_rules", ROOT / "scripts" / "k8s_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    ("manifest", "schema_file", "typo"),
    [
        ("base/servicemonitor.yaml", "servicemonitor.yaml", lambda m: m["spec"]["endpoints"][0].update(intreval="15s")),
        (
            "kserve/podmonitor.yaml",
            "podmonitor.yaml",
            lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="15"),
        ),
        (
            "common/prometheusrule.yaml",
            "prometheusrule.yaml",
            lambda m: m["spec"]["groups"][0]["rules"][0].update(alert="X"),
        ),
        (
            "kserve/inferenceservice.yaml",
            "inferenceservice.yaml",
            lambda m: m["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "Raw"}),
        ),
    ],
)
def test_crd_schemas_refuse_a_broken_resource(manifest: str, schema_file: str, typo: Callable[[dict], None]) -> None:
    (resource,) = load_documents(KUBERNETES / manifest)
    crd_validator(schema_file).validate(resource)
    typo(resource)
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(schema_file).validate(resource)


def test_strict_kubernetes_validation_refuses_an_unknown_field() -> None:
    deployment = next(m for m in objects_of("overlays/gpu") if m["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("kustomization", DEPLOYMENTS)
def test_invariants_hold(kustomization: str) -> None:
    objects = objects_of(kustomization)
    assert len(list(inv.servers(objects))) == 1
    problems = [problem for check in inv.ALL_CHECKS for problem in check(objects)]
    assert problems + inv.check_gpu(objects, DEPLOYMENTS[kustomization]) == []


def _server(objects: list[dict]) -> inv.Server:
    (server,) = inv.servers(objects)
    return server


def _probe(path: str) -> Callable[[list[dict]], None]:
    return lambda o: _server(o).container["readinessProbe"]["httpGet"].update(path=path)


def _mount(path: str) -> Callable[[list[dict]], None]:
    return lambda o: _server(o).container.update(
        volumeMounts=[m for m in _server(o).container["volumeMounts"] if m["mountPath"] != path]
    )


BREAKAGES = {
    "readiness on the liveness route": (inv.check_probes, _probe(inv.LIVE), "readinessProbe"),
    "no startup probe": (inv.check_probes, lambda o: _server(o).container.pop("startupProbe"), "startupProbe"),
    "startup too short for warm-up": (
        inv.check_probes,
        lambda o: _server(o).container["startupProbe"].update(failureThreshold=6),
        "warm-up",
    ),
    "grace period below the drain": (
        inv.check_drain,
        lambda o: _server(o).pod.update(terminationGracePeriodSeconds=60),
        "terminationGracePeriodSeconds",
    ),
    "longer drain, same grace": (
        inv.check_drain,
        lambda o: inv.settings(o).update(MIXOE_SHUTDOWN_TIMEOUT_S="45"),
        "does not exceed",
    ),
    "no preStop": (inv.check_drain, lambda o: _server(o).container.pop("lifecycle"), "preStop"),
    "runs as root": (inv.check_security, lambda o: _server(o).pod["securityContext"].update(runAsUser=0), "non-root"),
    "writable root filesystem": (
        inv.check_security,
        lambda o: _server(o).container["securityContext"].update(readOnlyRootFilesystem=False),
        "read-only root",
    ),
    "models mounted writable": (
        inv.check_volumes,
        lambda o: _server(o).container["volumeMounts"][0].update(readOnly=False),
        "read-only mount",
    ),
    "no /tmp volume": (inv.check_volumes, _mount("/tmp"), "/tmp"),
    "no metrics volume": (inv.check_volumes, _mount("/run/mixoe/metrics"), "/run/mixoe/metrics"),
    "latest tag": (
        inv.check_images,
        lambda o: _server(o).container.update(image="mixoe-service:latest"),
        "never latest",
    ),
    "no tag": (
        inv.check_images,
        lambda o: _server(o).container.update(image="registry:5000/mixoe-service"),
        "pinned tag",
    ),
    "no GPU": (
        lambda o: inv.check_gpu(o, 1),
        lambda o: _server(o).container["resources"]["limits"].pop(inv.GPU),
        inv.GPU,
    ),
    "GPU pod told to use the CPU": (
        lambda o: inv.check_gpu(o, 1),
        lambda o: inv.settings(o).update(MIXOE_DEVICE="cpu"),
        "MIXOE_DEVICE=cpu",
    ),
    "autoscaling target off the batch size": (
        inv.check_autoscaling,
        lambda o: inv.settings(o).update(MIXOE_MAX_BATCH_SIZE="32"),
        "at 32 per pod",
    ),
    "network policy open to every port": (
        inv.check_selectors,
        lambda o: next(m for m in o if m["kind"] == "NetworkPolicy")["spec"]["ingress"][0].pop("ports"),
        "port 8000 only",
    ),
    "service misses the pods": (
        inv.check_selectors,
        lambda o: next(m for m in o if m["kind"] == "Service")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "x"}
        ),
        "Service/mixoe",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_invariant_check_notices_its_breakage(breakage: str) -> None:
    check, mutate, expected = BREAKAGES[breakage]
    objects = objects_of("overlays/gpu")
    assert check(objects) == []
    mutate(objects)
    problems = check(objects)
    assert any(expected in problem for problem in problems), problems


def test_kserve_runs_the_same_container_and_settings_as_the_deployment() -> None:
    """One difference allowed: KServe's container name and port name (and PROTOCOL=v2, its flag for
    a custom predictor speaking the Open Inference Protocol)."""
    deployment, kserve = _server(objects_of("overlays/gpu")), _server(objects_of("kserve"))
    assert inv.settings(objects_of("overlays/gpu")) == inv.settings(objects_of("kserve"))
    ignored = {"name", "ports", "env"}
    assert {k: v for k, v in kserve.container.items() if k not in ignored} == {
        k: v for k, v in deployment.container.items() if k not in ignored
    }
    assert [e for e in kserve.container["env"] if e["name"] != "PROTOCOL"] == deployment.container["env"]
    assert {"name": "PROTOCOL", "value": "v2"} in kserve.container["env"]
    assert [p["containerPort"] for p in kserve.container["ports"]] == [
        p["containerPort"] for p in deployment.container["ports"]
    ]
    pod_fields = {k: v for k, v in deployment.pod.items() if k != "containers"}
    assert {k: kserve.pod.get(k) for k in pod_fields} == pod_fields


def test_monitoring_gives_the_job_the_alert_rules_expect() -> None:
    """``up{job="mixoe"}`` (MixOEServiceDown) must match what Prometheus Operator names the targets:
    a ServiceMonitor's job is the Service's name; the PodMonitor relabels it."""
    (down,) = [rule for rule in alert_rules() if rule["alert"] == "MixOEServiceDown"]
    job = down["expr"].split('job="')[1].split('"')[0]
    gpu = objects_of("overlays/gpu")
    (service,) = [m for m in gpu if m["kind"] == "Service"]
    (monitor,) = [m for m in gpu if m["kind"] == "ServiceMonitor"]
    assert service["metadata"]["name"] == job
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    (pod_monitor,) = [m for m in objects_of("kserve") if m["kind"] == "PodMonitor"]
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": job}]
    assert endpoint["port"] in {p["name"] for p in _server(objects_of("kserve")).container["ports"]}


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
    plain = [
        group
        for path in sorted(inv.ROOT.glob("deploy/prometheus/rules/*.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    ]
    assert rule["spec"]["groups"] == plain


def test_prometheus_rule_check_fails_when_a_rule_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed manifest passes ``--check``; after a rule file changes it is stale (exit 1)."""
    k8s_rules = _load_k8s_rules_script()
    assert k8s_rules.main(["--check"]) == 0
    rules_dir, manifest = tmp_path / "rules", tmp_path / "prometheusrule.yaml"
    rules_dir.mkdir()
    for path in sorted(k8s_rules.RULES_DIR.glob("*.yml")):
        text = path.read_text(encoding="utf-8")
        assert "for: 15m" in text or path.name != "mixoe.rules.yml"
        (rules_dir / path.name).write_text(text.replace("for: 15m", "for: 20m"), encoding="utf-8")
    manifest.write_text(k8s_rules.MANIFEST.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(k8s_rules, "RULES_DIR", rules_dir)
    monkeypatch.setattr(k8s_rules, "MANIFEST", manifest)
    assert k8s_rules.main(["--check"]) == 1
    assert k8s_rules.main([]) == 0  # rewrites it
    assert k8s_rules.main(["--check"]) == 0
    assert "for: 20m" in manifest.read_text(encoding="utf-8")
