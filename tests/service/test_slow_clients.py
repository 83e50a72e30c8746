"""Slow clients against the real server: connections that send nothing, trickle their headers or
their body, are closed by the deadlines while other clients are served; connections beyond the
cap are refused before anything is read from them.

Deadlines here are 1 s; a connection passes if the server closes it between 0.9 s (no sooner than
its deadline: the deadline, not something else, closed it) and 10 s.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.local import LocalServer, start_local_server
from tests.service.helpers import TinyModel, role_files

DEADLINE_S = 1.0
CLOSED_WITHIN_S = 10.0
TRICKLE_EVERY_S = 0.2


@dataclass
class SlowClient:
    """One connection that sends ``first`` at once, then ``trickle`` every ``TRICKLE_EVERY_S``."""

    name: str
    first: bytes
    trickle: bytes = b""
    sock: socket.socket = field(init=False)
    opened: float = field(init=False)
    received: bytes = b""
    closed_after: float | None = None

    def open(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.sock.sendall(self.first)

    def send_more(self) -> None:
        try:
            self.sock.sendall(self.trickle)
        except OSError:  # the server closed it: recv says so
            pass

    def read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.received += data
        if not data:
            self.closed_after = time.monotonic() - self.opened
            self.sock.close()


def _start(tiny: TinyModel, log: Path, **settings: str) -> LocalServer:
    return start_local_server(
        {"model_repository": str(tiny.repository), "device": "cpu", "decode_workers": "1"} | settings, log, timeout_s=90
    )


@pytest.fixture(scope="module")
def strict(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = _start(
        tiny, tmp_path_factory.mktemp("slow") / "server.log", header_timeout_s=str(DEADLINE_S), body_timeout_s=str(DEADLINE_S)
    )
    try:
        yield server
    finally:
        server.stop()


def _port(server: LocalServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_slow_and_silent_connections_are_closed_while_others_are_served(strict: LocalServer, tiny: TinyModel) -> None:
    host = b"Host: 127.0.0.1\r\n"
    live = b"GET /v2/health/live HTTP/1.1\r\n" + host
    pad = b"X-Pad: 1\r\n"  # one more header line, every TRICKLE_EVERY_S
    body_head = (
        b"POST /predict HTTP/1.1\r\n" + host + b"Content-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n"
    )
    clients = [
        SlowClient("silent", b""),
        SlowClient("slow headers", b"POST /predict HTTP/1.1\r\n" + host, pad),
        SlowClient("slow body", body_head, b"x" * 10),
        SlowClient("slow second request", live + b"\r\n" + live, pad),
    ]
    for client in clients:
        client.open(_port(strict))
    normal = httpx.post(f"{strict.url}/predict", files=role_files(tiny, "accepted"), timeout=30)
    assert normal.status_code == 200, normal.text
    started = time.monotonic()
    while time.monotonic() - started < CLOSED_WITHIN_S + 1 and any(c.closed_after is None for c in clients):
        waiting = [c for c in clients if c.closed_after is None]
        readable, _, _ = select.select([c.sock for c in waiting], [], [], TRICKLE_EVERY_S)
        for client in waiting:
            if client.sock in readable:
                client.read()
            if client.closed_after is None and client.trickle:
                client.send_more()
    closed = {c.name: c.closed_after for c in clients}
    assert all(after is not None and DEADLINE_S * 0.9 <= after < CLOSED_WITHIN_S for after in closed.values()), closed
    answers = {c.name: c.received.split(b"\r\n", 1)[0] for c in clients}
    assert answers == {
        "silent": b"",
        "slow headers": b"",
        "slow body": b"HTTP/1.1 408 Request Timeout",
        "slow second request": b"HTTP/1.1 200 OK",  # its first request; the second never completed
    }
    slow_body = clients[2].received
    assert json.loads(slow_body.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
    again = httpx.post(f"{strict.url}/predict", files=role_files(tiny, "accepted"), timeout=30)
    assert again.status_code == 200


def test_connections_beyond_the_cap_are_refused_before_reading(tiny: TinyModel, tmp_path: Path) -> None:
    """Three silent connections fill a cap of three: a fourth gets the JSON 503 and is closed without
    having sent a byte; once one of the three closes, new connections are served again."""
    server = _start(tiny, tmp_path / "cap.log", max_connections="3", header_timeout_s="60", retry_after_s="2")
    try:
        held = [socket.create_connection(("127.0.0.1", _port(server))) for _ in range(3)]
        # The server accepts connections in the order they were made: the three are in before this one.
        with socket.create_connection(("127.0.0.1", _port(server))) as extra:
            extra.settimeout(30)
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
        assert b"retry-after: 2" in head.lower() and b"connection: close" in head.lower()
        assert json.loads(body)["code"] == "overloaded"
        held.pop().close()
        deadline = time.monotonic() + 30
        while True:  # until the server has seen the close (a state change, not a duration)
            try:
                if httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "a freed place never served a new connection"
            time.sleep(0.05)
        for sock in held:
            sock.close()
    finally:
        server.stop()
