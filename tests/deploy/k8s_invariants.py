"""What every rendered deployment of the service must hold, as checks that name what is wrong.

Each ``check_*`` returns a list of problems (empty when the objects are fine), so that a test can
both require none on the committed manifests and show that each check notices its invariant being
broken (``tests/deploy/test_kubernetes.py``). The numbers come from the service and the image:
the probe routes of ``service/api/routes/ops.py``, the drain of ``service/__main__.py`` (requests in
flight, then the batch queues, each up to ``MIXOE_SHUTDOWN_TIMEOUT_S``), the Dockerfile's user.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tests.deploy.kustomize import render, split_image
from tests.deploy.promql import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
DEPLOYMENTS = {"overlays/gpu": 1, "overlays/cpu": 0, "kserve": 1}
"""The kustomizations that deploy the service, with the GPUs each gives a pod."""

SERVICE_PORT = 8000
READY, LIVE = "/v2/health/ready", "/v2/health/live"
STARTUP_BUDGET_S = 180  # the Dockerfile HEALTHCHECK's start period: a cold node's CUDA start
SERVER_READ_WINDOW_S = 0.5  # service.server reads requests this long after SIGTERM
AUTOSCALING_METRIC = "mixoe_queue_depth_avg1m"
GPU = "nvidia.com/gpu"


@functools.cache
def _rendered(kustomization: str) -> tuple[dict, ...]:
    return tuple(render(KUBERNETES / kustomization))


def objects_of(kustomization: str) -> list[dict]:
    """The objects ``deploy/kubernetes/<kustomization>`` renders to, a fresh copy to change at will."""
    return copy.deepcopy(list(_rendered(kustomization)))


def image_user() -> int:
    """The uid of the Dockerfile's ``USER`` line."""
    match = re.search(r"^USER (\d+):\d+$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.MULTILINE)
    assert match, "Dockerfile has no numeric USER uid:gid line"
    return int(match.group(1))


@dataclass
class Server:
    """A workload that runs the service: its pod spec, the service's container, the pods' labels."""

    name: str
    pod: dict
    container: dict
    pod_labels: dict


def servers(objects: list[dict]) -> Iterator[Server]:
    """The Deployment's pods and the InferenceService's predictor (KServe inlines a PodSpec there)."""
    for manifest in objects:
        if manifest["kind"] == "Deployment":
            template = manifest["spec"]["template"]
            pod, labels = template["spec"], template["metadata"]["labels"]
            container_name = "mixoe"
        elif manifest["kind"] == "InferenceService":
            pod = manifest["spec"]["predictor"]
            labels, container_name = pod.get("labels", {}), "kserve-container"
        else:
            continue
        (container,) = [c for c in pod["containers"] if c["name"] == container_name]
        yield Server(f"{manifest['kind']}/{manifest['metadata']['name']}", pod, container, labels)


def settings(objects: list[dict]) -> dict[str, str]:
    (config,) = [m for m in objects if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "mixoe-settings"]
    return config["data"]


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def check_probes(objects: list[dict]) -> list[str]:
    problems = []
    for server in servers(objects):
        container = server.container
        for probe, path in (("startupProbe", LIVE), ("readinessProbe", READY), ("livenessProbe", LIVE)):
            get = container.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") != SERVICE_PORT:
                problems.append(f"{server.name}: {probe} must GET {path} on port {SERVICE_PORT}, got {get or None}")
        startup = container.get("startupProbe", {})
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        if budget < STARTUP_BUDGET_S:
            problems.append(
                f"{server.name}: startupProbe allows {budget} s for warm-up, less than {STARTUP_BUDGET_S} s"
            )
    return problems


def check_drain(objects: list[dict]) -> list[str]:
    shutdown_timeout = float(settings(objects)["MIXOE_SHUTDOWN_TIMEOUT_S"])
    problems = []
    for server in servers(objects):
        pause = server.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if pause <= 0:
            problems.append(f"{server.name}: no preStop pause before SIGTERM")
        needed = pause + 2 * shutdown_timeout + SERVER_READ_WINDOW_S
        grace = server.pod.get("terminationGracePeriodSeconds", 30)
        if grace <= needed:
            problems.append(
                f"{server.name}: terminationGracePeriodSeconds {grace} does not exceed preStop + drain ({needed} s)"
            )
    return problems


def check_security(objects: list[dict]) -> list[str]:
    uid, problems = image_user(), []
    for server in servers(objects):
        pod_context, context = server.pod.get("securityContext", {}), server.container.get("securityContext", {})
        if pod_context.get("runAsNonRoot") is not True or pod_context.get("runAsUser") != uid:
            problems.append(f"{server.name}: pod must run as non-root uid {uid}")
        if context.get("readOnlyRootFilesystem") is not True or context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{server.name}: container needs a read-only root filesystem and no privilege escalation")
    return problems


def check_volumes(objects: list[dict]) -> list[str]:
    """The models come read-only from a PVC; every path the service writes is an emptyDir."""
    problems = []
    for server in servers(objects):
        volumes = {volume["name"]: volume for volume in server.pod.get("volumes", [])}
        mounts = {mount["mountPath"]: mount for mount in server.container.get("volumeMounts", [])}
        repository = settings(objects)["MIXOE_MODEL_REPOSITORY"]
        models = mounts.get(repository, {})
        claim = volumes.get(models.get("name"), {}).get("persistentVolumeClaim")
        if not (models.get("readOnly") and claim and claim.get("readOnly")):
            problems.append(f"{server.name}: {repository} must be a read-only mount of a read-only PVC")
        writable = ["/tmp", _env(server.container).get("PROMETHEUS_MULTIPROC_DIR")]
        for path in writable:
            if path is None or "emptyDir" not in volumes.get(mounts.get(path, {}).get("name"), {}):
                problems.append(f"{server.name}: the service writes {path}, which must be an emptyDir mount")
    return problems


def check_images(objects: list[dict]) -> list[str]:
    problems = []
    for server in servers(objects):
        for container in server.pod["containers"]:
            image = container["image"]
            _, tag = split_image(image)
            if "@sha256:" not in image and tag in (None, "latest"):
                problems.append(f"{server.name}: image {image} must carry a pinned tag or digest, never latest")
    return problems


def check_gpu(objects: list[dict], gpus: int) -> list[str]:
    """``gpus`` GPUs per pod (0: none), and the device setting that goes with it."""
    problems, device = [], settings(objects)["MIXOE_DEVICE"]
    for server in servers(objects):
        limits = server.container.get("resources", {}).get("limits", {})
        if int(limits.get(GPU, 0)) != gpus:
            problems.append(f"{server.name}: {GPU} limit is {limits.get(GPU, 0)}, expected {gpus}")
    if (device == "cuda") != (gpus > 0):
        problems.append(f"MIXOE_DEVICE={device} with {gpus} GPU per pod")
    return problems


def check_autoscaling(objects: list[dict]) -> list[str]:
    """Each workload scaled on the queue-depth metric, at about one full batch waiting per pod."""
    targets = {
        (m["spec"]["scaleTargetRef"]["kind"], m["spec"]["scaleTargetRef"]["name"]): m
        for m in objects
        if m["kind"] == "HorizontalPodAutoscaler"
    }
    batch, problems = settings(objects)["MIXOE_MAX_BATCH_SIZE"], []
    for server in servers(objects):
        kind, name = server.name.split("/")
        scaled = ("Deployment", name if kind == "Deployment" else f"{name}-predictor")
        autoscaler = targets.get(scaled)
        metrics = autoscaler["spec"]["metrics"] if autoscaler else []
        wanted = [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": AUTOSCALING_METRIC},
                    "target": {"type": "AverageValue", "averageValue": batch},
                },
            }
        ]
        if metrics != wanted:
            problems.append(
                f"{server.name}: needs an autoscaler of {scaled} on {AUTOSCALING_METRIC} at {batch} per pod"
            )
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


_POD_SELECTORS = {  # where each kind keeps the labels of the pods it reaches
    "Service": lambda spec: spec.get("selector"),
    "PodDisruptionBudget": lambda spec: spec.get("selector", {}).get("matchLabels"),
    "NetworkPolicy": lambda spec: spec.get("podSelector", {}).get("matchLabels"),
    "PodMonitor": lambda spec: spec.get("selector", {}).get("matchLabels"),
}


def check_selectors(objects: list[dict]) -> list[str]:
    """The Service, the disruption budget, the network policy and the monitors reach the pods;
    the network policy opens the service's port and no other."""
    problems, pods = [], list(servers(objects))
    for manifest in objects:
        kind, spec, name = manifest["kind"], manifest.get("spec", {}), manifest["metadata"]["name"]
        if kind in _POD_SELECTORS and not all(_selects(_POD_SELECTORS[kind](spec), pod.pod_labels) for pod in pods):
            problems.append(f"{kind}/{name} does not select every server pod")
        if kind == "NetworkPolicy":
            rules = spec.get("ingress", [])
            if not rules or any([p.get("port") for p in r.get("ports", [])] != [SERVICE_PORT] for r in rules):
                problems.append(f"NetworkPolicy/{name} must admit port {SERVICE_PORT} only")
    return problems


ALL_CHECKS = (
    check_probes,
    check_drain,
    check_security,
    check_volumes,
    check_images,
    check_autoscaling,
    check_selectors,
)
