"""docker-compose.yml (GPU) and docker-compose.cpu.yml validate with the real Compose binary and say
what the deployment needs: a GPU for the api, the model repository, Prometheus and Grafana wired in."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.deploy.promql import ROOT
from tests.deploy.tools import run_tool

GPU = ("-f", "docker-compose.yml")
CPU = ("-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml")
_SETTINGS = ("MIXOE_", "API_PORT", "GRAFANA_ADMIN_PASSWORD", "MONITORING_BIND", "COMPOSE_")


def _config(files: tuple[str, ...], **variables: str) -> dict[str, Any]:
    """The fully resolved project, as ``docker-compose config`` prints it, with only ``variables`` set."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(_SETTINGS)} | variables
    result = run_tool("docker-compose", *files, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return _config(GPU)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return _config(CPU)


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["target"]: volume for volume in service.get("volumes", [])}


def test_compose_file_validates_quietly() -> None:
    result = run_tool("docker-compose", *GPU, "config", "--quiet")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_api_reserves_one_nvidia_gpu_and_is_built_from_the_dockerfile(gpu: dict[str, Any]) -> None:
    api = gpu["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert api["environment"]["MIXOE_DEVICE"] == "cuda"
    assert api["build"]["context"] == str(ROOT) and api["build"]["dockerfile"] == "Dockerfile"
    assert [(port["target"], port["published"]) for port in api["ports"]] == [(8000, "8000")]


def test_api_serves_the_model_repository_volume_read_only(gpu: dict[str, Any]) -> None:
    api = gpu["services"]["api"]
    repository = api["environment"]["MIXOE_MODEL_REPOSITORY"]
    mount = _mounts(api)[repository]
    assert mount["source"] == str(ROOT / "models" / "repository") and mount["read_only"] is True
    moved = _config(GPU, MIXOE_MODEL_DIR="/srv/mixoe/models", API_PORT="9000")["services"]["api"]
    assert _mounts(moved)[repository]["source"] == "/srv/mixoe/models"
    assert moved["ports"][0]["published"] == "9000" and moved["ports"][0]["target"] == 8000


def test_cpu_variant_drops_the_gpu_and_keeps_everything_else(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    api = cpu["services"]["api"]
    assert not api.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert api["environment"]["MIXOE_DEVICE"] == "cpu"
    assert _mounts(api) == _mounts(gpu["services"]["api"])
    assert cpu["services"]["prometheus"] == gpu["services"]["prometheus"]
    assert cpu["services"]["grafana"] == gpu["services"]["grafana"]


def test_monitoring_mounts_the_deploy_directory_and_stays_on_loopback(gpu: dict[str, Any]) -> None:
    prometheus, grafana = gpu["services"]["prometheus"], gpu["services"]["grafana"]
    assert _mounts(prometheus)["/etc/prometheus"]["source"] == str(ROOT / "deploy" / "prometheus")
    assert _mounts(grafana)["/etc/grafana/provisioning"]["source"] == str(ROOT / "deploy" / "grafana" / "provisioning")
    assert _mounts(grafana)["/etc/grafana/dashboards"]["source"] == str(ROOT / "deploy" / "grafana" / "dashboards")
    for service in (prometheus, grafana):
        assert all(port["host_ip"] == "127.0.0.1" for port in service["ports"])
        assert ":" in service["image"] and not service["image"].endswith(":latest"), "pin monitoring images"
