"""The uvicorn server the service runs on, alone or in each worker of :mod:`service.supervisor`.

It overrides :meth:`uvicorn.Server.shutdown`, a public method whose behaviour this relies on:
pyproject.toml bounds uvicorn to the versions tested, and ``tests/service/test_uvicorn_api.py``
fails if the signatures used here change.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

# How long a stopping server goes on reading requests on connections it has already accepted.
ACCEPTED_CONNECTION_GRACE_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that it answers every connection it accepted before it stopped.

    On shutdown uvicorn stops accepting and at once closes each connection that has no request in
    progress, including one accepted a moment before whose request has not been read yet: its
    client sees the connection closed without an answer. With several workers sharing one socket
    that happened during SIGHUP roll-overs (the retiring worker had taken the connection). This
    server first stops accepting, so that waiting connections go to the other workers, then reads
    for ``ACCEPTED_CONNECTION_GRACE_S`` more before uvicorn's own shutdown."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        logging.getLogger("uvicorn.error").info(
            "Draining: accepting no new connections, reading requests on accepted ones for %s s",
            ACCEPTED_CONNECTION_GRACE_S,
        )
        await asyncio.sleep(ACCEPTED_CONNECTION_GRACE_S)
        await super().shutdown(sockets)

