"""``python -m service`` / ``mixoe-serve``: run the service under uvicorn, configured by ``MIXOE_*``.

One process serves one device (run one container per GPU): concurrency comes from the
micro-batcher, not from worker processes, which would each hold a copy of the model. On SIGTERM
uvicorn stops accepting connections and waits for in-flight requests (at most
``MIXOE_SHUTDOWN_TIMEOUT_S``); the lifespan then drains the batch queues.
"""

from __future__ import annotations

import math

import uvicorn

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings


def main() -> None:
    """Serve with settings from ``MIXOE_*`` variables, overridden by flags (``mixoe-serve --help``)."""
    settings = Settings(_cli_parse_args=True, _cli_prog_name="mixoe-serve", _cli_kebab_case=True)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON handlers configured above
        log_level=settings.log_level,
        access_log=False,  # service.access logs each request once, as JSON
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        server_header=False,
    )


if __name__ == "__main__":
    main()
