"""The parts of uvicorn the service builds on (:mod:`service.server`, :mod:`service.supervisor`).

pyproject.toml bounds uvicorn to the versions tested; these fail first if a new one changes them."""

from __future__ import annotations

import inspect

import uvicorn
from uvicorn.config import STARTUP_FAILURE


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_server_runs_on_given_sockets_and_its_overridden_hooks_keep_their_signatures() -> None:
    assert parameters(uvicorn.Server.__init__) == ["self", "config"]
    assert parameters(uvicorn.Server.run) == ["self", "sockets"]
    for hook in (uvicorn.Server.startup, uvicorn.Server.shutdown):  # DrainingServer, _ReportingServer
        assert inspect.iscoroutinefunction(hook)
        assert parameters(hook) == ["self", "sockets"]


def test_a_server_says_whether_it_started() -> None:
    server = uvicorn.Server(uvicorn.Config("tests.service.supervised_apps:failing_lifespan", log_config=None))
    assert server.started is False


def test_the_config_binds_the_socket_the_workers_share_and_configures_logging_in_each() -> None:
    assert parameters(uvicorn.Config.bind_socket) == ["self"]
    assert parameters(uvicorn.Config.configure_logging) == ["self"]
    assert STARTUP_FAILURE == 3  # the exit status mixoe-serve documents for a start-up failure
