"""One request must never stall the server: faults of the model process, injected one at a time.

Each fault is held open by an event, never a race: a model process whose batch loop stops
answering (a hang), one whose step fails with runs of two workers merged, and one killed with a
batch in it. The bounds are generous (answered within 10 s with a 1 s deadline), so a loaded
machine passes as surely as an idle one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from models.runtime import Bundle
from service.api.errors import DeadlineExceeded, ErrorCode, NotReady
from service.app import create_app
from service.local import log_entries
from service.runtime.batch_loop.inference import ModelRunner
from service.runtime.batch_loop.host_tasks import Task
from service.runtime.model_client import HostClient
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.batch_loop.model_process import ModelProcess
from service.runtime.protocol import Call, Failed, Judged, model_key
from service.settings import Settings
from tests.service.helpers import TinyModel, role_files, sample_value
from tests.service.test_model_process import (
    ROLES, Inbox, crops, host_with_batches, loaded_by, model_process_pid, run, start_with_model_process,
)

BOUND_S = 10.0  # what "at once" means here, for a 1 s deadline


class Hang:
    """Makes the model process's batch loop stop in its next forward pass until :meth:`release`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self._released = threading.Event()
        real_start = ModelRunner.start

        def start(runner: ModelRunner, *args: Any) -> Any:
            self.entered.set()
            assert self._released.wait(60), "the test never released the hang"
            return real_start(runner, *args)

        monkeypatch.setattr(ModelRunner, "start", start)

    def release(self) -> None:
        self._released.set()


def wait_for(condition: Callable[[], bool], what: str) -> float:
    """Seconds until ``condition`` held, polled every 50 ms; fails after ``BOUND_S``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < BOUND_S, f"{what} not within {BOUND_S} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_hung_model_process_is_a_504_and_not_ready_until_it_answers_again(
    tiny: TinyModel, make_settings: Callable[..., Settings], model_process_in_threads: ModelHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(model_process=True, model_process_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/health/ready").status_code == 200
        hang = Hang(monkeypatch)
        started = time.monotonic()
        response = client.post("/predict", files=role_files(tiny, *ROLES))
        assert time.monotonic() - started < BOUND_S and hang.entered.is_set()
        assert response.status_code == 504
        assert response.json() == {
            "error": "the model process did not answer a Run call by its deadline",
            "code": "model_timeout",
            "file": None,
        }
        not_ready = client.get("/v2/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["code"] == "not_ready" and "model process" in not_ready.json()["error"]
        assert client.get("/v2/health/live").status_code == 200  # the parent's watchdog decides on a restart
        hang.release()
        wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "ready again")
        # The same connection serves on: the late answer to the run that timed out is thrown away.
        again = client.post("/predict", files=role_files(tiny, *ROLES))
        assert [p["accepted"] for p in again.json()["predictions"]] == [True, True, False]


def test_a_call_past_its_deadline_leaves_the_connection_and_its_models_usable(
    tiny: TinyModel, bundle: Bundle, model_process_in_threads: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def calls() -> None:
        client = HostClient.from_environment(timeout_s=1.0)
        assert (await client.load(model_key(bundle))).decodes_jpeg is False
        hang = Hang(monkeypatch)
        with pytest.raises(DeadlineExceeded, match="did not answer a Run call"):
            await client.call(run(bundle, crops(bundle, tiny, ROLES[:1])), Judged, 1.0)
        with pytest.raises(DeadlineExceeded, match="did not answer a Ping call"):
            await client.ping()
        assert not client.answering
        hang.release()
        judged = await client.call(run(bundle, crops(bundle, tiny, ROLES)), Judged, BOUND_S)  # late answers skipped
        assert [verdict.accepted for verdict in judged.verdicts if verdict] == [True, True, False]
        assert client.answering
        assert model_process_in_threads.loaded == [model_key(bundle)]  # no reconnection, no reload
        await client.close()

    asyncio.run(calls())


def test_a_step_that_fails_outside_the_forward_pass_answers_every_worker_in_the_merged_batch(
    tiny: TinyModel, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, batches = host_with_batches(max_batch_size=8)
    first, second = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    observe = batches.observe

    def broken_observe(value: float) -> None:
        raise RuntimeError("metrics broke")

    monkeypatch.setattr(batches, "observe", broken_observe)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES[:2]))))
    host.submit(Task(second, run(bundle, crops(bundle, tiny, ROLES[2:]))))
    host.step()  # one merged batch of both workers' runs, failing as it is answered
    assert first.replies == second.replies == [Failed("RuntimeError: metrics broke")]
    monkeypatch.setattr(batches, "observe", observe)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES))))
    host.step()  # the loop serves on
    assert isinstance(first.replies[-1], Judged) and len(first.replies[-1].verdicts) == 3


def test_the_watchdog_kills_a_model_process_that_stops_answering(make_settings: Callable[..., Settings]) -> None:
    failed = threading.Event()
    model_process = ModelProcess(make_settings(model_process_timeout_s=1.0), on_failure=failed.set)
    model_process.start()
    try:
        asyncio.run(ping_once())  # it answers
        process = model_process._process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGSTOP)  # it stops answering, and does not exit
        assert failed.wait(BOUND_S), "the watchdog did not notice the hang"
        assert model_process.died
        process.join(BOUND_S)
        assert process.exitcode == -signal.SIGKILL
    finally:
        model_process.stop()


def test_a_model_process_that_dies_while_a_heartbeat_is_out_is_reported_dead_not_hung(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failed = threading.Event()
    model_process = ModelProcess(make_settings(), on_failure=failed.set)
    killed: list[int] = []

    async def dies_during_the_ping(client: HostClient) -> None:
        process = model_process._process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        killed.append(process.pid)
        raise NotReady(ErrorCode.NOT_READY, "the model process is not answering (EOFError())")

    monkeypatch.setattr(HostClient, "ping", dies_during_the_ping)
    with caplog.at_level(logging.ERROR, logger="mixoe.model_process"):
        model_process.start()
        try:
            assert failed.wait(BOUND_S), "the watchdog did not notice the death"
        finally:
            model_process.stop()
    assert model_process.died
    assert [r.getMessage() for r in caplog.records if "stopping the service" in r.getMessage()] == [
        f"the model process (pid {killed[0]}) exited with status {-signal.SIGKILL}; stopping the service"
    ]


async def ping_once() -> None:
    client = HostClient.from_environment(timeout_s=BOUND_S)
    try:
        await client.ping()
    finally:
        await client.close()


def images_handed_over(url: str) -> float:
    """Images the workers have sent to the model process and not yet had answered."""
    return sample_value(httpx.get(f"{url}/metrics", timeout=BOUND_S).text, "mixoe_queue_depth")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_model_process_that_fails_mid_batch_fails_the_batch_and_stops_the_service_with_status_1(
    tiny: TinyModel, tmp_path: Path, fault: str
) -> None:
    """Killed: the request waiting on it gets a 503 at once. Hung: the watchdog kills it within
    the timeout (1 s here) plus the heartbeat interval; the request gets its 504 or that 503."""
    log = tmp_path / "model-process.log"
    served = start_with_model_process(tiny, log, "1", timeout_s="1")
    answers: list[httpx.Response] = []
    try:
        pid = model_process_pid(log)
        os.kill(pid, signal.SIGSTOP)  # the batch reaches it and waits there
        files = role_files(tiny, *ROLES)
        request = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{served.url}/predict", files=files, timeout=60))
        )
        request.start()
        wait_for(lambda: images_handed_over(served.url) == len(ROLES), "the run handed over")
        if fault == "killed":
            os.kill(pid, signal.SIGKILL)
        request.join(BOUND_S)
        served.process.wait(timeout=BOUND_S * 3)
    finally:
        status = served.stop()
    assert status == 1
    [answer] = answers
    expected = {"killed": {503}, "hung": {503, 504}}[fault]
    assert answer.status_code in expected and answer.json()["code"] in {"not_ready", "model_timeout"}
    said = {"killed": "status -9", "hung": "stopped answering"}[fault]
    assert any("the model process" in e["message"] and said in e["message"] for e in log_entries(log))


def test_a_call_the_model_process_cannot_take_drops_only_that_connection(
    tiny: TinyModel, bundle: Bundle, model_process_in_threads: ModelHost
) -> None:
    """A run with no valid top-k (built past ``__init__``, as unpickling does) never reaches a
    batch where it would fail the other workers' runs."""
    good = run(bundle, crops(bundle, tiny, ROLES))
    bad = run(bundle, crops(bundle, tiny, ROLES[:1]))
    object.__setattr__(bad, "top_k", 0)
    assert Call(1, bad).valid is False and Call(1, good).valid is True

    async def calls() -> Judged:
        sender, other = (HostClient.from_environment(timeout_s=BOUND_S) for _ in range(2))
        try:
            await sender.load(model_key(bundle))
            await other.load(model_key(bundle))
            with pytest.raises(NotReady, match="not answering"):
                await sender.call(bad, Judged, BOUND_S)
            return await other.call(good, Judged, BOUND_S)
        finally:
            await sender.close()
            await other.close()

    judged = asyncio.run(calls())
    assert [verdict.accepted for verdict in judged.verdicts if verdict] == [True, True, False]


_WORKER_WITH_A_RUN_IN_FLIGHT = """
import asyncio
import sys

import numpy as np

from models.runtime import load_bundle
from service.runtime.model_client import HostClient
from service.runtime.protocol import Judged, Run, model_key

async def main():
    bundle = load_bundle(sys.argv[1])
    client = HostClient.from_environment(timeout_s=60)
    await client.load(model_key(bundle))
    size = bundle.manifest.preprocessing.input_size
    crops = np.zeros((2, 3, size, size), dtype=np.uint8)
    await client.call(Run(model_key(bundle), crops, [], bundle.operating_point(None), 1), Judged, 60)

asyncio.run(main())
"""


def test_a_worker_killed_with_a_run_in_flight_costs_the_other_workers_nothing(
    tiny: TinyModel, bundle: Bundle, model_process_in_threads: ModelHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model process answers a dead worker's run into a closed connection, releases it, and
    serves the others on; the model stays loaded for them."""
    hang = Hang(monkeypatch)
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER_WITH_A_RUN_IN_FLIGHT, str(bundle.path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert hang.entered.wait(BOUND_S * 6), "the worker's run never reached a batch"
        worker.kill()
        worker.wait(BOUND_S)
    finally:
        worker.kill()
    hang.release()

    async def other_worker() -> Judged:
        client = HostClient.from_environment(timeout_s=BOUND_S)
        try:
            await client.load(model_key(bundle))
            return await client.call(run(bundle, crops(bundle, tiny, ROLES)), Judged, BOUND_S)
        finally:
            await client.close()

    judged = asyncio.run(other_worker())
    assert [verdict.accepted for verdict in judged.verdicts if verdict] == [True, True, False]
    # Both workers have gone: the model process released the model (the dead one's too).
    wait_for(lambda: model_process_in_threads.loaded == [], "the model released")
