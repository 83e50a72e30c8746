"""The real thing: ``python -m service`` under uvicorn on 127.0.0.1, driven over TCP.

Checks what only a real server shows: the packaged entry point starts, /predict over the network
matches the bundle, the real ``tritonclient.http`` client round-trips (binary and JSON tensors),
every request leaves one JSON log line, and SIGTERM finishes queued work before exiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from models.bundle import Predictions
from tests.service.helpers import TinyModel, role_files, triton_input

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("accepted", "borderline", "rejected")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(repository: Path, log: Path, **settings: str) -> Server:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MIXOE_")}
    port = _free_port()
    environment |= {
        "MIXOE_MODEL_REPOSITORY": str(repository),
        "MIXOE_HOST": "127.0.0.1",
        "MIXOE_PORT": str(port),
        "MIXOE_DEVICE": "cpu",
        "MIXOE_DECODE_WORKERS": "2",
    } | {f"MIXOE_{key.upper()}": value for key, value in settings.items()}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=sink, stderr=sink
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise AssertionError(f"server not ready after 90 s:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    """SIGTERM, then SIGKILL if it has not exited within 20 s; returns the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)
    return server.process.returncode


@pytest.fixture(scope="module")
def server(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tiny.repository, tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield running
    finally:
        stop_server(running)


def _predict(server: Server, tiny: TinyModel, query: str = "") -> list[dict[str, object]]:
    response = httpx.post(f"{server.url}/predict{query}", files=role_files(tiny, *ROLES), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_predict_over_tcp_matches_the_bundle(
    server: Server, tiny: TinyModel, predict_direct: Callable[[Sequence[bytes], float | None], Predictions]
) -> None:
    predictions = _predict(server, tiny)
    reference = predict_direct([tiny.images[role] for role in ROLES], None)
    assert [p["class_index"] for p in predictions] == reference.probabilities.argmax(dim=1).tolist()
    assert [p["ood_score"]["value"] for p in predictions] == pytest.approx(reference.scores.tolist(), abs=1e-5)
    assert [p["accepted"] for p in predictions] == reference.accepted.tolist() == [True, True, False]


@pytest.mark.parametrize("operating_point", [None, 0.9])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_round_trip_matches_predict(
    server: Server, tiny: TinyModel, binary: bool, operating_point: float | None
) -> None:
    client = InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        assert client.get_model_metadata("tiny")["inputs"][0]["datatype"] == "BYTES"
        tensor = triton_input([tiny.images[role] for role in ROLES], binary)
        if binary:
            outputs = None  # tritonclient then asks for every output, as binary data
        else:
            outputs = [
                InferRequestedOutput(name, binary_data=False)
                for name in ("label", "class_index", "ood_score", "accepted")
            ]
        parameters = None if operating_point is None else {"operating_point": operating_point}
        result = client.infer("tiny", [tensor], outputs=outputs, parameters=parameters)
    finally:
        client.close()
    expected = _predict(server, tiny, "" if operating_point is None else f"?operating_point={operating_point}")
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [p["label"] for p in expected]
    assert result.as_numpy("class_index").tolist() == [p["class_index"] for p in expected]
    assert result.as_numpy("accepted").tolist() == [p["accepted"] for p in expected]
    assert result.as_numpy("ood_score") == pytest.approx([p["ood_score"]["value"] for p in expected], abs=1e-5)


def test_tritonclient_sees_errors_as_messages(server: Server) -> None:
    client = InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        tensor = InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as raised:
            client.infer("tiny", [tensor])
        assert "[400]" in str(raised.value) and "not an image" in str(raised.value)
        with pytest.raises(InferenceServerException, match="no model named 'cars'"):
            client.infer("cars", [tensor])
    finally:
        client.close()
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_each_request_logs_one_json_line(server: Server, tiny: TinyModel) -> None:
    def access_lines() -> list[dict[str, object]]:
        return [e for e in server.log_lines() if e.get("logger") == "mixoe.access" and e.get("route") == "/predict"]

    before = len(access_lines())  # earlier tests in this module used the same server
    _predict(server, tiny)
    deadline = time.monotonic() + 5
    while len(access_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a second line for the same request would be there by now
    entries = access_lines()
    assert len(entries) == before + 1
    entry = entries[-1]
    assert (entry["method"], entry["status"], entry["images"]) == ("POST", 200, 3)
    assert isinstance(entry["duration_s"], float) and entry["duration_s"] > 0
    assert not [e for e in server.log_lines() if e.get("logger") == "uvicorn.access"]  # uvicorn's own log is off


def test_sigterm_finishes_queued_work(tiny: TinyModel, tmp_path: Path) -> None:
    """Requests waiting for a slow-to-fill batch when SIGTERM arrives still get their answers."""
    slow = start_server(tiny.repository, tmp_path / "drain.log", max_batch_delay_ms="3000", max_batch_size="64")
    try:
        responses: list[httpx.Response] = []

        def send(role: str) -> None:
            responses.append(httpx.post(f"{slow.url}/predict", files=role_files(tiny, role), timeout=30))

        threads = [threading.Thread(target=send, args=(role,)) for role in ROLES]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # the requests now sit in the batcher, waiting for the 3 s window to close
        slow.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        # uvicorn re-raises the signal once its graceful shutdown is done: exit status -SIGTERM.
        assert slow.process.wait(timeout=30) in (0, -signal.SIGTERM)
        messages = [entry["message"] for entry in slow.log_lines()]
        assert messages.index("Application shutdown complete.") > max(
            index for index, message in enumerate(messages) if message == "POST /predict 200"
        )
        assert time.monotonic() - started >= 2.5  # they were answered when the batch ran, not cut off
        assert sorted(r.status_code for r in responses) == [200, 200, 200]
        assert {r.json()["predictions"][0]["filename"] for r in responses} == {f"{role}.png" for role in ROLES}
    finally:
        stop_server(slow)
