"""``python -m service`` / ``mixoe-serve``: run the service under uvicorn, configured by ``MIXOE_*``.

One process serves one device by default (run one container per GPU): concurrency comes from the
micro-batcher. When one Python process cannot keep a GPU busy (its event loop parses every upload
and its threads share one interpreter lock), ``MIXOE_WORKERS=N`` starts N processes on the same
device and port: each holds its own copy of the models and forms its own batches, and the metrics
of all of them are merged (:mod:`service.metrics`). On SIGTERM uvicorn stops accepting connections
and waits for in-flight requests (at most ``MIXOE_SHUTDOWN_TIMEOUT_S``); the lifespan then drains
the batch queues, in every worker.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.metrics import MULTIPROCESS_DIRECTORY_VARIABLE
from service.settings import Settings


def main() -> None:
    """Serve with settings from ``MIXOE_*`` variables, overridden by flags (``mixoe-serve --help``)."""
    try:
        settings = Settings(_cli_parse_args=True, _cli_prog_name="mixoe-serve", _cli_kebab_case=True)
    except ValidationError as error:
        raise SystemExit(f"mixoe-serve: invalid settings (flags or MIXOE_* variables):\n{_describe(error)}") from None
    configure_logging(settings.log_level)
    if settings.workers == 1:
        _serve(create_app(settings), settings)
        return
    # Workers are fresh interpreters: they read the parsed settings back from the environment,
    # and prometheus_client must see the shared directory before they import it.
    os.environ.update(settings.environment())
    with _metrics_directory() as directory:
        os.environ[MULTIPROCESS_DIRECTORY_VARIABLE] = str(directory)
        _serve("service.__main__:worker_app", settings, factory=True, workers=settings.workers)


def worker_app() -> FastAPI:
    """The app of one worker process (``MIXOE_WORKERS`` > 1), configured by the parent's variables."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)


def _describe(error: ValidationError) -> str:
    """One line per bad setting, named as its flag: ``--workers: Input should be ... (got '0')``.

    Problems between settings have no single flag and quote none; API keys are never echoed."""
    lines = []
    for problem in error.errors():
        if not problem["loc"]:
            lines.append(f"  {problem['msg']}")
            continue
        name = str(problem["loc"][0])
        shown = "" if name == "api_keys" else f" (got {problem['input']!r})"
        lines.append(f"  --{name.replace('_', '-')}: {problem['msg']}{shown}")
    return "\n".join(lines)


def _serve(app: FastAPI | str, settings: Settings, **options: object) -> None:
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON handlers configured above
        log_level=settings.log_level,
        access_log=False,  # service.access logs each request once, as JSON
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        server_header=False,
        **options,
    )


@contextmanager
def _metrics_directory() -> Iterator[Path]:
    """The directory the workers share their metrics in, emptied first (stale files would count).

    ``PROMETHEUS_MULTIPROC_DIR`` when the deployment sets it (a tmpfs volume, say), else a
    temporary directory removed at exit."""
    configured = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    if configured is None:
        with tempfile.TemporaryDirectory(prefix="mixoe-metrics-") as temporary:
            yield Path(temporary)
        return
    directory = Path(configured)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    yield directory


if __name__ == "__main__":
    main()
