"""One JSON object per log line, so log shippers index fields instead of parsing prose; failures
that explain themselves in one line, without the traceback that only a developer reads."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from models.contract.manifest import BundleError

# Attributes every LogRecord has (and uvicorn's ANSI-coloured duplicate of the message); anything
# else was passed in ``extra=`` and becomes a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "pid", "message", **extra}`` plus ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which worker, when MIXOE_WORKERS runs several
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Send the service's and uvicorn's logs to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # service.api.access logs every request once, with its route template and image count.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False


def log_failure(logger: logging.Logger, message: str, error: BaseException) -> None:
    """Log ``message`` for ``error`` at error level.

    A :class:`BundleError` (a bundle that does not load, a model that gives NaN) already says what
    is wrong and where: it goes out as one line, its traceback at debug level only. Any other error
    is unexpected, and keeps its traceback."""
    if isinstance(error, BundleError):
        logger.error("%s: %s", message, error)
        logger.debug("%s", message, exc_info=error)
    else:
        logger.error("%s", message, exc_info=error)
