"""The supervisor decides a worker's start-up failure from what the worker reports, on the first
attempt, whether its app factory or its lifespan fails; and a worker that says nothing in time
has failed too (and, stuck, is killed rather than waited for).

The supervisor runs here in the test process, over tiny apps (:mod:`tests.service.supervised_apps`);
``tests/service/test_server.py`` drives it through ``python -m service`` with the real app.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.supervisor import Supervisor
from tests.service.supervised_apps import BROKEN_FACTORY_MESSAGE

APPS = "tests.service.supervised_apps"


def supervise(app: str, factory: bool, caplog: pytest.LogCaptureFixture, start_timeout_s: float) -> tuple[int, list[str]]:
    """Run a supervisor of two workers of ``app``; its exit status and its log."""
    config = uvicorn.Config(app, factory=factory, host="127.0.0.1", port=0, log_config=None)
    caplog.set_level(logging.INFO, logger="mixoe.supervisor")
    status = Supervisor(config, workers=2, start_timeout_s=start_timeout_s).run()
    return status, [record.getMessage() for record in caplog.records if record.name == "mixoe.supervisor"]


@pytest.mark.parametrize(
    ("app", "factory", "reason"),
    [
        (f"{APPS}:broken_factory", True, f"RuntimeError: {BROKEN_FACTORY_MESSAGE}"),
        (f"{APPS}:failing_lifespan", False, "it could not load or start its application"),
        (f"{APPS}:no_such_app", False, "it could not load or start its application"),
    ],
    ids=["app-factory", "lifespan", "import"],
)
def test_a_worker_that_reports_a_failed_start_stops_every_worker_with_status_3(
    caplog: pytest.LogCaptureFixture, app: str, factory: bool, reason: str
) -> None:
    # A start-up timeout far beyond the test: the failure can only have come from the report.
    status, messages = supervise(app, factory, caplog, start_timeout_s=600)
    assert status == STARTUP_FAILURE
    assert sum(message.startswith("Started worker process") for message in messages) == 2  # none restarted
    [failure] = [message for message in messages if "stopping the server" in message]
    assert "failed to start: " + reason in failure


def test_a_worker_silent_past_the_start_timeout_is_killed_and_is_a_start_up_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The factory never returns, and its server holds SIGTERM meanwhile: only a kill ends it.
    status, messages = supervise(f"{APPS}:hanging_factory", True, caplog, start_timeout_s=1)
    assert status == STARTUP_FAILURE
    assert sum(message.startswith("Started worker process") for message in messages) == 2
    [failure] = [message for message in messages if "stopping the server" in message]
    assert "was not serving within 1 s" in failure


def test_a_worker_stuck_in_its_drain_is_killed_after_the_stop_timeout(caplog: pytest.LogCaptureFixture) -> None:
    config = uvicorn.Config(f"{APPS}:stuck_shutdown", host="127.0.0.1", port=0, log_config=None)
    caplog.set_level(logging.INFO, logger="mixoe.supervisor")
    supervisor = Supervisor(config, workers=1, start_timeout_s=600, stop_timeout_s=1)

    def stop_once_serving() -> None:
        while not supervisor._workers:  # set once every worker has reported that it serves
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's signal: drain, and its worker gets stuck

    threading.Thread(target=stop_once_serving, daemon=True).start()
    assert supervisor.run() == 0
    messages = [record.getMessage() for record in caplog.records if record.name == "mixoe.supervisor"]
    assert any("did not stop within 1 s; killed it" in message for message in messages)
