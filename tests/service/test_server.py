"""The real thing: ``python -m service`` under uvicorn on 127.0.0.1, driven over TCP.

Checks what only a real server shows: the packaged entry point starts, /predict over the network
matches the bundle, the real ``tritonclient.http`` client round-trips (binary and JSON tensors),
every request leaves one JSON log line, SIGTERM finishes queued work before exiting, and several
worker processes share one port and one set of metrics.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from models.runtime import Predictions
from service.local import LocalProcessError, LocalServer, log_entries, start_local_server, started_workers
from tests.service.helpers import TinyModel, build_tiny_bundle, role_files, triton_input

ROLES = ("accepted", "borderline", "rejected")


def start_server(repository: Path, log: Path, **settings: str) -> LocalServer:
    return start_local_server(
        {"model_repository": str(repository), "device": "cpu", "decode_workers": "2", "batch_size_tuning": "false"}
        | settings,
        log,
        timeout_s=90,
    )


def log_lines(server: LocalServer) -> list[dict[str, Any]]:
    return log_entries(server.log)


@pytest.fixture(scope="module")
def server(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    running = start_server(tiny.repository, tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield running
    finally:
        running.stop()


def _predict(server: LocalServer, tiny: TinyModel, query: str = "") -> list[dict[str, object]]:
    response = httpx.post(f"{server.url}/predict{query}", files=role_files(tiny, *ROLES), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_predict_over_tcp_matches_the_bundle(
    server: LocalServer, tiny: TinyModel, predict_direct: Callable[[Sequence[bytes], float | None], Predictions]
) -> None:
    predictions = _predict(server, tiny)
    reference = predict_direct([tiny.images[role] for role in ROLES], None)
    assert [p["class_index"] for p in predictions] == reference.probabilities.argmax(dim=1).tolist()
    assert [p["ood_score"]["value"] for p in predictions] == pytest.approx(reference.scores.tolist(), abs=1e-5)
    assert [p["accepted"] for p in predictions] == reference.accepted.tolist() == [True, True, False]


@pytest.mark.parametrize("operating_point", [None, 0.9])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_round_trip_matches_predict(
    server: LocalServer, tiny: TinyModel, binary: bool, operating_point: float | None
) -> None:
    client = InferenceServerClient(server.url.removeprefix("http://"))
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


def test_tritonclient_sees_errors_as_messages(server: LocalServer) -> None:
    client = InferenceServerClient(server.url.removeprefix("http://"))
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


def test_each_request_logs_one_json_line(server: LocalServer, tiny: TinyModel) -> None:
    def access_lines() -> list[dict[str, object]]:
        return [e for e in log_lines(server) if e.get("logger") == "mixoe.access" and e.get("route") == "/predict"]

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
    assert not [e for e in log_lines(server) if e.get("logger") == "uvicorn.access"]  # uvicorn's own log is off


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
        messages = [entry["message"] for entry in log_lines(slow)]
        assert messages.index("Application shutdown complete.") > max(
            index for index, message in enumerate(messages) if message == "POST /predict 200"
        )
        assert time.monotonic() - started >= 2.5  # they were answered when the batch ran, not cut off
        assert sorted(r.status_code for r in responses) == [200, 200, 200]
        assert {r.json()["predictions"][0]["filename"] for r in responses} == {f"{role}.png" for role in ROLES}
    finally:
        slow.stop()


def test_several_workers_serve_one_port_and_report_one_set_of_metrics(tiny: TinyModel, tmp_path: Path) -> None:
    """``workers=2``: two processes load the model and answer on the same port; /metrics, whichever of
    them answers it, counts every prediction once; SIGTERM stops both."""
    served = start_server(tiny.repository, tmp_path / "workers.log", workers="2")  # returns once both started
    try:
        workers = started_workers(served.log)
        assert len(workers) == 2 and served.process.pid not in workers
        files = role_files(tiny, *ROLES)

        def send(_: int) -> int:
            with httpx.Client(base_url=served.url, timeout=30) as client:  # a new connection each
                return client.post("/predict", files=files).status_code

        def serving() -> set[object]:
            return {entry["pid"] for entry in log_lines(served) if entry["message"] == "POST /predict 200"}

        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while serving() != workers and sent < 400:  # which worker accepts a connection is the kernel's choice
                assert list(pool.map(send, range(8))) == [200] * 8
                sent += 8
        assert serving() == workers
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(httpx.get(f"{served.url}/metrics").text)
            for sample in family.samples
        }
        predictions = sum(value for (name, _), value in samples.items() if name == "mixoe_predictions_total")
        assert predictions == sent * len(ROLES)
        assert [value for (name, _), value in samples.items() if name == "mixoe_model_info"] == [1.0]
        assert samples[("mixoe_queue_depth", ())] == 0.0
    finally:
        status = served.stop()
    assert status in (0, -signal.SIGTERM)
    finished = {entry["pid"] for entry in log_lines(served) if entry["message"] == "Application shutdown complete."}
    assert finished == workers


def test_killed_workers_are_replaced_and_counts_never_go_back(tiny: TinyModel, tmp_path: Path) -> None:
    """Both workers are killed: the supervisor starts two new ones, which serve, and /metrics still
    counts what the dead ones answered (a counter that fell back would read as a reset)."""
    served = start_server(tiny.repository, tmp_path / "killed.log", workers="2")
    try:
        files = role_files(tiny, "accepted")

        def predict() -> None:
            assert httpx.post(f"{served.url}/predict", files=files, timeout=60).status_code == 200

        def samples(name: str) -> list[float]:
            families = text_string_to_metric_families(httpx.get(f"{served.url}/metrics").text)
            return [sample.value for family in families for sample in family.samples if sample.name == name]

        for _ in range(6):
            predict()
        first = started_workers(served.log)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while len(started_workers(served.log) - first) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(started_workers(served.log) - first) == 2
        for _ in range(2):
            predict()
        assert samples("mixoe_predictions_total") == [8.0]
        assert samples("mixoe_model_info") == [1.0] and samples("mixoe_queue_depth") == [0.0]
    finally:
        status = served.stop()
    assert status in (0, -signal.SIGTERM)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_stopping_server_answers_the_connections_it_had_accepted(tiny: TinyModel, tmp_path: Path, workers: str) -> None:
    """A request that arrives after SIGTERM, on a connection accepted before it, is answered.

    uvicorn alone closes such a connection unanswered as it starts to shut down; with several
    workers a SIGHUP roll-over retires workers under traffic, and clients saw exactly that."""
    served = start_server(tiny.repository, tmp_path / "draining.log", workers=workers)
    address = httpx.URL(served.url)
    with socket.create_connection((address.host, address.port), timeout=30) as connection:
        time.sleep(0.3)  # accepted by now
        served.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while sum(entry["message"].startswith("Draining") for entry in log_lines(served)) < int(workers):
            assert time.monotonic() < deadline, "the server did not begin to shut down"
            time.sleep(0.02)
        connection.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {address.host}\r\n\r\n".encode())
        response = connection.recv(4096)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert served.process.wait(timeout=60) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("model_process", ["false", "true"])
def test_sighup_rolls_the_workers_onto_a_new_bundle_and_keeps_them_when_it_is_broken(
    tmp_path: Path, model_process: str
) -> None:
    """With several workers SIGHUP replaces them one at a time, each new one serving before an old
    one stops: a new bundle version goes live without a refused request. A broken one is refused by
    the first new worker and the old workers keep serving. With a model process, it loads the new
    version for the new workers and releases the old one once no worker uses it."""
    tiny = build_tiny_bundle(tmp_path / "repository")
    served = start_server(tiny.repository, tmp_path / "rolling.log", workers="2", model_process=model_process)

    def versions() -> set[object]:
        answers = []
        for _ in range(6):
            with httpx.Client(timeout=60) as client:  # a new connection each: either worker
                answers.append(client.post(f"{served.url}/predict", files=role_files(tiny, "accepted")))
        assert [answer.status_code for answer in answers] == [200] * 6
        return {answer.json()["version"] for answer in answers}

    def finished() -> set[object]:
        return {entry["pid"] for entry in log_lines(served) if entry["message"] == "Application shutdown complete."}

    try:
        assert versions() == {"1"}
        first = started_workers(served.log)
        build_tiny_bundle(tiny.repository, version="2")
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while not (len(started_workers(served.log) - first) == 2 and finished() >= first):
            assert time.monotonic() < deadline, "the workers were not replaced"
            assert versions() <= {"1", "2"}  # answered throughout, by old or new workers
            time.sleep(0.2)
        assert versions() == {"2"}
        # Make before break: each old worker began to shut down only while a new one served beside
        # the other two (the log's order is the order of events: one file, appended to by all).
        serving: set[object] = set()
        for entry in log_lines(served):
            if entry["message"] == "Application startup complete.":
                serving.add(entry["pid"])
            elif entry["message"] == "Shutting down" and entry["pid"] in first:
                assert len(serving) == 3, f"worker {entry['pid']} stopped while {sorted(serving)} served"
                serving.discard(entry["pid"])

        second = started_workers(served.log) - first
        broken = build_tiny_bundle(tiny.repository, version="3")
        (broken.path / "weights.safetensors").write_bytes(b"not the weights the manifest hashed")
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while not any("aborting the restart" in str(entry["message"]) for entry in log_lines(served)):
            assert time.monotonic() < deadline, "the broken restart was not abandoned"
            time.sleep(0.2)
        assert versions() == {"2"}
        assert not finished() & second  # the workers of version 2 are still the ones serving
        if model_process == "true":
            released = [entry["message"] for entry in log_lines(served) if "released" in str(entry["message"])]
            assert released == [f"batch loop released {tiny.path}: no worker uses it any more"]
    finally:
        status = served.stop()
    assert status in (0, -signal.SIGTERM)


def test_a_worker_that_cannot_start_stops_the_server_with_status_3(tmp_path: Path) -> None:
    """A bad repository fails every worker's start-up (in its lifespan); the supervisor must not exit 0
    (restart policies and scripts would take that for a clean stop). The worker says so, so the
    first failure decides: no worker is restarted, and no timeout is involved (the default 30 s)."""
    log = tmp_path / "failing.log"
    with pytest.raises(LocalProcessError, match="exited with 3"):
        start_server(tmp_path / "missing", log, workers="2")
    messages = [str(entry["message"]) for entry in log_entries(log) if entry["logger"] == "mixoe.supervisor"]
    assert sum(message.startswith("Started worker process") for message in messages) == 2
    [failure] = [message for message in messages if "stopping the server" in message]
    assert "failed to start: it could not load or start its application" in failure
    assert any(str(entry["message"]).startswith("the service could not start") for entry in log_entries(log))
