"""Every way of deploying the service keeps its invariants (tests/deploy/k8s_invariants.py), each
check notices its invariant being broken, and the KServe variant runs what the Deployment runs."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tests.deploy import k8s_invariants as inv
from tests.deploy.k8s_invariants import DEPLOYMENTS, objects_of
from tests.deploy.promql import alert_rules


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


@pytest.mark.parametrize("kustomization", DEPLOYMENTS)
def test_the_service_accepts_the_settings(kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ConfigMap variable names a setting (the service ignores unknown MIXOE_* variables, so a
    typo would silently leave the default) with a value the service accepts (or every pod stops)."""
    from service.settings import Settings  # imports torch: only here

    variables = inv.settings(objects_of(kustomization))
    assert {name.removeprefix("MIXOE_").lower() for name in variables} <= set(Settings.model_fields)
    for name in [name for name in os.environ if name.upper().startswith("MIXOE_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.model_repository) == "/models"
    assert settings.shutdown_timeout_s == float(variables["MIXOE_SHUTDOWN_TIMEOUT_S"])
    assert settings.device == ("cuda" if DEPLOYMENTS[kustomization] else "cpu")
