"""A real Prometheus, with the real rules, scrapes a real service process; the rejection ratio it
records for accepted and rejected traffic is read back through Prometheus' HTTP API.

Everything listens on 127.0.0.1 (free ports); Prometheus scrapes and evaluates rules every second
and keeps its data in a temporary directory.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.local import free_port, start_local_server, stop_process, wait_until_ok
from tests.deploy.promql import EXPORTED_SERIES, RULES_DIR
from tests.deploy.tools import find_tool
from tests.helpers.scripts import load_script

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 120.0
QUERY_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class Tiny:
    repository: Path
    accept: bytes
    reject: bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The smoke-test bundle of scripts/make_tiny_bundle.py (also used by scripts/build_image.sh)."""
    module = load_script("make_tiny_bundle")
    repository, images = tmp_path_factory.mktemp("repository"), tmp_path_factory.mktemp("images")
    module.make_tiny_bundle(repository, images)
    return Tiny(repository, (images / "accept.png").read_bytes(), (images / "reject.png").read_bytes())


@pytest.fixture(scope="module")
def service(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = {"model_repository": str(tiny.repository), "device": "cpu", "decode_workers": "2"}
    server = start_local_server(settings, tmp_path_factory.mktemp("service") / "service.log", STARTUP_TIMEOUT_S)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = find_tool("prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted(RULES_DIR.glob("*.yml"))],
        "scrape_configs": [
            {
                "job_name": "mixoe",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [service.removeprefix("http://")]}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = directory / "prometheus.log"
    command = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=directory, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/-/ready", process, log, 60)
        yield url
    finally:
        stop_process(process)


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _eventually(prometheus: str, expr: str, predicate: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Poll ``expr`` until ``predicate`` holds on its result; fail with the last result otherwise."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _query(prometheus, expr)
        if predicate(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{expr} never satisfied the check within {QUERY_TIMEOUT_S:.0f}s; last result: {result}")


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _predict(service: str, *images: bytes) -> list[bool]:
    files = [("files", (f"image-{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{service}/predict", files=files, timeout=30)
    assert response.status_code == 200, response.text
    return [prediction["accepted"] for prediction in response.json()["predictions"]]


def test_prometheus_records_the_rejection_ratio_of_real_traffic(tiny: Tiny, service: str, prometheus: str) -> None:
    # Warm-up: one accepted and one rejected image create both counter series in the same request,
    # so that every later increment lies inside Prometheus' view of them.
    assert _predict(service, tiny.accept, tiny.reject) == [True, False]
    counted = 'sum by (decision) (mixoe_predictions_total{model="tiny", version="1"})'
    _eventually(
        prometheus,
        counted,
        lambda result: {r["metric"]["decision"]: r["value"][1] for r in result} == {"accepted": "1", "rejected": "1"},
    )

    # Measured traffic: 6 accepted, 2 rejected -> a rejection ratio of 2 / 8, at the default 0.95
    # operating point, which is calibrated to reject 5% of in-distribution images.
    for _ in range(2):
        assert _predict(service, tiny.accept, tiny.accept, tiny.reject, tiny.accept) == [True, True, False, True]
    empty = httpx.post(f"{service}/predict", files=[("files", ("empty.png", b"", "image/png"))], timeout=30)
    assert empty.status_code == 400  # counted in mixoe_bad_inputs_total, not as a prediction

    selector = '{model="tiny", version="1"}'
    ratio = _eventually(
        prometheus,
        f"mixoe:rejection_ratio:rate5m{selector}",
        lambda result: _value(result) is not None and abs(_value(result) - 0.25) < 1e-6,
    )
    assert {key: ratio[0]["metric"][key] for key in ("model", "version")} == {"model": "tiny", "version": "1"}
    expected = _eventually(
        prometheus,
        f"mixoe:expected_rejection_ratio:rate5m{selector}",
        lambda result: _value(result) is not None and abs(_value(result) - 0.05) < 1e-9,
    )
    assert len(expected) == 1
    assert _value(_query(prometheus, 'up{job="mixoe"}')) == 1.0

    # Every series the rules and the dashboard may read was really scraped from the service.
    names = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=5).json()["data"]
    missing = EXPORTED_SERIES - set(names)
    assert not missing, f"the service does not export {sorted(missing)}"
