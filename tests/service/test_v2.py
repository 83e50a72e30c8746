"""Open Inference Protocol routes through TestClient, with request bodies written by tritonclient."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from tritonclient.http import InferenceServerClient

from service.api.oip import InferCall, parse_infer_request
from service.api.routes import v2
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TinyModel, infer_json, role_files, triton_input

ROLES = ("accepted", "borderline", "rejected")


def test_server_and_model_metadata(client: TestClient) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "mixoe-service" and "binary_tensor_data" in server["extensions"]
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
        metadata = client.get(path).json()
        assert (metadata["name"], metadata["versions"]) == ("tiny", ["1"])
        assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        outputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["outputs"]}
        assert outputs == {
            "label": "BYTES",
            "class_index": "INT64",
            "probability": "FP32",
            "ood_score": "FP32",
            "p_value": "FP32",
            "accepted": "BOOL",
            "decision": "BYTES",
        }
        assert metadata["parameters"]["class_names"] == ["red", "green", "blue"]
        assert [p["target_id_acceptance"] for p in metadata["parameters"]["operating_points"]] == [0.9, 0.95, 0.99]
        assert [level["max_risk"] for level in metadata["parameters"]["risk_levels"]] == [0.05, 0.2]
        assert metadata["parameters"]["default_max_risk"] is None


def test_health_and_model_readiness(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "versions": ["1"], "ready": True}
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    assert client.get("/v2/models/tiny/versions/9/ready").status_code == 404
    assert client.get("/v2/models/cars/ready").status_code == 404


@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json"])
@pytest.mark.parametrize("operating_point", [None, 0.9])
def test_infer_agrees_with_predict(
    client: TestClient, tiny: TinyModel, binary: bool, operating_point: float | None
) -> None:
    tensor = triton_input([tiny.images[role] for role in ROLES], binary)
    parameters = {} if operating_point is None else {"operating_point": operating_point}
    body, header_length = InferenceServerClient.generate_request_body([tensor], parameters=parameters)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    result = InferenceServerClient.parse_response_body(
        response.content, header_length=response.headers.get("Inference-Header-Content-Length")
    )

    query = "" if operating_point is None else f"?operating_point={operating_point}"
    expected = client.post(f"/predict{query}", files=role_files(tiny, *ROLES)).json()["predictions"]
    assert [label.decode() for label in result.as_numpy("label")] == [p["label"] for p in expected]
    assert result.as_numpy("class_index").tolist() == [p["class_index"] for p in expected]
    assert result.as_numpy("accepted").tolist() == [p["accepted"] for p in expected]
    assert result.as_numpy("ood_score") == pytest.approx([p["ood_score"]["value"] for p in expected], abs=1e-5)
    assert result.as_numpy("probability") == pytest.approx([p["probability"] for p in expected], abs=1e-5)
    assert result.as_numpy("p_value") == pytest.approx([p["p_value"] for p in expected], abs=1e-6)
    response_parameters = result.get_response()["parameters"]
    assert response_parameters["operating_point"] == (operating_point or 0.95)
    assert response_parameters["threshold"] == expected[0]["threshold"]


def test_infer_bodies_are_parsed_off_the_event_loop(
    client: TestClient, tiny: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []

    def recording(*args: object, **kwargs: object) -> InferCall:
        threads.append(threading.current_thread().name)
        return parse_infer_request(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(v2, "parse_infer_request", recording)
    assert client.post("/v2/models/tiny/infer", json=infer_json(tiny.images["accepted"])).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("mixoe-decode")


def test_not_ready_until_the_models_load(make_settings: Callable[..., Settings]) -> None:
    client = TestClient(create_app(make_settings()))  # no `with`: the lifespan (model loading) never runs
    assert client.get("/v2/health/live").status_code == 200
    for path in ("/v2/health/ready", "/metrics", "/v2/models/tiny"):
        response = client.get(path)
        assert (response.status_code, response.json()["code"]) == (503, "not_ready"), path
