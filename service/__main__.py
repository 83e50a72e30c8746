"""``python -m service`` / ``mixoe-serve``: run the service under uvicorn, configured by ``MIXOE_*``.

One process serves one device by default (run one container per GPU): concurrency comes from the
batch loop, which merges the images of every request in flight. When one Python process cannot keep a GPU busy (its event loop parses every upload
and its threads share one interpreter lock), ``MIXOE_WORKERS=N`` starts N processes on the same
device and port, and the metrics of all of them are merged (:mod:`service.monitoring.metrics`). On a CUDA
device (or with ``MIXOE_MODEL_PROCESS=true``) one more process then holds the models and runs the
batches of all workers together (:mod:`service.runtime.batch_loop.model_process`); with
``MIXOE_MODEL_PROCESS=false`` each worker holds its own copy of the models and its own batch loop. On SIGTERM the server stops accepting
connections, reads requests on those it accepted for half a second more (:mod:`service.server`),
and waits for in-flight requests (at most ``MIXOE_SHUTDOWN_TIMEOUT_S``); the lifespan then drains
the batch queues, in every worker. Under the supervisor, SIGHUP replaces them one at a time (each
new one serving before an old one stops): how new bundle versions go live without downtime.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE

from service.api.connections import GuardedHttpProtocol
from service.app import create_app
from service.monitoring.logs import configure_logging
from service.monitoring.metrics import MULTIPROCESS_DIRECTORY_VARIABLE
from service.runtime.batch_loop.model_process import ModelProcess
from service.server import ACCEPTED_CONNECTION_GRACE_S, DrainingServer
from service.settings import Settings, is_setting_variable
from service.supervisor import Supervisor


_STOP_MARGIN_S = 10.0  # beyond a draining worker's own deadlines, before it counts as stuck


def main() -> None:
    """Serve with settings from ``MIXOE_*`` variables, overridden by flags (``mixoe-serve --help``)."""
    try:
        settings = Settings(_cli_parse_args=True, _cli_prog_name="mixoe-serve", _cli_kebab_case=True)
    except ValidationError as error:
        raise SystemExit(f"mixoe-serve: invalid settings (flags or MIXOE_* variables):\n{_describe(error)}") from None
    configure_logging(settings.log_level)
    # A model process is a second process to supervise, and its metrics are shared through files:
    # the supervisor's path even for one worker.
    single = settings.workers == 1 and not settings.uses_model_process
    with _shared_metrics_directory(not single), _model_process(settings) as model_process:
        try:
            if single:
                server = DrainingServer(uvicorn.Config(create_app(settings), **_server_options(settings)))
                try:
                    server.run()
                except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down
                    pass
                if not server.started:
                    raise SystemExit(STARTUP_FAILURE)
            else:
                _serve_workers(settings)
        except SystemExit:
            _exit_if_died(model_process)  # a dead model process also fails the workers' start-ups
            raise
        _exit_if_died(model_process)


def _exit_if_died(model_process: ModelProcess | None) -> None:
    if model_process is not None and model_process.died:
        raise SystemExit("mixoe-serve: the model process died, so the service stopped (see the log above)")


def worker_app() -> FastAPI:
    """The app of one worker process under the supervisor (``MIXOE_WORKERS`` > 1 or ``MIXOE_MODEL_PROCESS``),
    configured by the variables the parent exported (:func:`export_settings`)."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def export_settings(settings: Settings) -> None:
    """Make this process's ``MIXOE_*`` variables say exactly ``settings``, for worker processes to read.

    Variables for settings that are now unset go too: ``--default-model null`` must not leave the
    workers reading an older ``MIXOE_DEFAULT_MODEL``."""
    for key in [key for key in os.environ if is_setting_variable(key)]:
        del os.environ[key]
    os.environ.update(settings.environment())


def _serve_workers(settings: Settings) -> None:
    """``settings.workers`` spawned processes sharing one listening socket (:mod:`service.supervisor`).

    A worker that cannot start (a bad bundle, say) stops the server with exit status 3, as with one
    process, so restart policies and scripts see the failure."""
    export_settings(settings)
    config = uvicorn.Config("service.__main__:worker_app", factory=True, **_server_options(settings))
    # A draining worker reads its accepted connections, waits for in-flight requests (at most the
    # shutdown timeout) and drains its batch queues (as long again); one still running after that
    # and a margin is stuck, and is killed.
    stop_timeout_s = ACCEPTED_CONNECTION_GRACE_S + 2 * math.ceil(settings.shutdown_timeout_s) + _STOP_MARGIN_S
    status = Supervisor(config, settings.workers, settings.worker_timeout_s, stop_timeout_s).run()
    if status != 0:
        raise SystemExit(status)


def _server_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep the JSON handlers configured above
        "log_level": settings.log_level,
        "access_log": False,  # service.api.access logs each request once, as JSON
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_timeout_s),
        "server_header": False,
        "http": GuardedHttpProtocol,  # header deadline and connection cap (service.api.connections)
    }


@contextmanager
def _model_process(settings: Settings) -> Iterator[ModelProcess | None]:
    """The model process (``MIXOE_MODEL_PROCESS``), running before any worker starts; else ``None``."""
    if not settings.uses_model_process:
        yield None
        return
    model_process = ModelProcess(settings)
    try:
        model_process.start()
    except RuntimeError as error:
        logging.getLogger("mixoe.service").error("%s", error)
        raise SystemExit(STARTUP_FAILURE) from None
    try:
        yield model_process
    finally:
        model_process.stop()


@contextmanager
def _shared_metrics_directory(shared: bool) -> Iterator[None]:
    """Prepare the directory where the service's processes share their metrics, when there is one.

    ``PROMETHEUS_MULTIPROC_DIR`` when the deployment sets it (a tmpfs volume, say; it then applies
    to a single process too), else, for several processes (workers, or a worker and the model
    process), a temporary directory removed at exit.
    Emptied first: files of an earlier run would be counted. Set before any worker starts, since
    prometheus_client reads it when imported."""
    configured = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    if configured == "":
        raise SystemExit(
            f"mixoe-serve: {MULTIPROCESS_DIRECTORY_VARIABLE} is set but empty: unset it or name a directory"
        )
    if configured is None and not shared:
        yield
        return
    with ExitStack() as cleanup:
        if configured is None:
            directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mixoe-metrics-")))
        else:
            directory = Path(configured)
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db"):
                stale.unlink()
        os.environ[MULTIPROCESS_DIRECTORY_VARIABLE] = str(directory)
        yield


def _describe(error: ValidationError) -> str:
    """One line per bad setting: ``--workers / MIXOE_WORKERS: Input should be ... (got '0')``.

    A problem between settings (a queue smaller than one request) has no single name."""
    lines = []
    for problem in error.errors():
        if problem["loc"]:
            name = str(problem["loc"][0])
            where = f"--{name.replace('_', '-')} / MIXOE_{name.upper()}: "
            lines.append(f"  {where}{problem['msg']} (got {problem['input']!r})")
        else:
            lines.append(f"  {problem['msg']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
