"""API keys guard the prediction routes only; probes, metadata and metrics stay open."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel, infer_json, role_files, sample_value

KEYS = ["first-secret", "second-secret"]


@pytest.fixture(scope="module")
def guarded(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(api_keys=KEYS))) as test_client:
        yield test_client


def _predict(client: TestClient, tiny: TinyModel, headers: dict[str, str]) -> tuple[int, str]:
    response = client.post("/predict", files=role_files(tiny, "accepted"), headers=headers)
    return response.status_code, response.json().get("code", "")


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zmlyc3Qtc2VjcmV0"}],
    ids=["none", "wrong-x-api-key", "wrong-bearer", "not-bearer"],
)
def test_missing_or_wrong_keys_are_401(guarded: TestClient, tiny: TinyModel, headers: dict[str, str]) -> None:
    response = guarded.post("/predict", files=role_files(tiny, "accepted"), headers=headers)
    assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert guarded.post("/v2/models/tiny/infer", json=infer_json(b"x"), headers=headers).status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": KEYS[0]},
        {"X-API-Key": KEYS[1]},
        {"Authorization": f"Bearer {KEYS[1]}"},
        {"authorization": f"bearer {KEYS[0]}"},
    ],
    ids=["x-api-key", "second-key", "bearer", "lower-case"],
)
def test_any_configured_key_in_either_header_passes(
    guarded: TestClient, tiny: TinyModel, headers: dict[str, str]
) -> None:
    assert _predict(guarded, tiny, headers) == (200, "")


def test_probes_metadata_and_metrics_need_no_key(guarded: TestClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/tiny", "/v2/models/tiny/ready", "/metrics"):
        assert guarded.get(path).status_code == 200, path


def test_auth_failures_are_not_bad_inputs(guarded: TestClient, tiny: TinyModel) -> None:
    before = guarded.get("/metrics").text
    assert _predict(guarded, tiny, {"X-API-Key": "wrong"})[0] == 401
    after = guarded.get("/metrics").text
    total = "mixoe_bad_inputs_total"
    assert (
        sample_value(after, total, {"reason": "unauthorized"})
        == sample_value(before, total, {"reason": "unauthorized"})
        == 0
    )
    assert sample_value(after, "mixoe_requests_total", {"route": "/predict", "status": "401"}) >= 1
