"""HTTP/1.1 load for ``POST /predict``: keep-alive connections posting pre-built multipart bodies
back to back, spread over client processes that start once per benchmark.

It speaks HTTP over asyncio streams itself, at about 0.1 ms of client CPU per request: httpx's
connection pool spent about 9 ms per request here (it scans every pooled connection for each
request), so on a GPU node the client, not the server, would have been measured. The processes
start once: a spawned process imports the benchmark's main module, torch included, which took
about 8 s on an H200 node, paid twice per server run when each measurement made its own pool.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import multiprocessing.pool
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

BOUNDARY = "mixoe-serve-bench"
# A request unanswered this long counts as an error: a hung server delays a run's end by at most this.
REQUEST_TIMEOUT_S = 120.0


def multipart_body(files: list[tuple[str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_bodies(jpegs: list[tuple[str, bytes]], per_request: int) -> list[bytes]:
    """Multipart bodies of ``per_request`` JPEGs each, built once, so that the load generator spends
    its CPU on sending, not encoding."""
    cycle = itertools.cycle(jpegs)
    return [multipart_body([next(cycle) for _ in range(per_request)]) for _ in range(max(1, len(jpegs) // per_request))]


@dataclass(frozen=True)
class Load:
    """What one run of the load generator saw."""

    latencies: list[float]  # seconds, requests answered with 200
    errors: int  # answered with anything else, or not at all
    seconds: float
    busiest_client_share: float  # the busiest client process's CPU share; near 1, the client limited the run


class LoadGenerator:
    """``processes`` client processes (spawned once, on entering) that drive a server on request.

    ``bodies`` travel to each process once, when it starts, not with every run."""

    def __init__(self, bodies: list[bytes], processes: int):
        self._bodies = bodies
        self._processes = processes
        self._pool: multiprocessing.pool.Pool | None = None

    def __enter__(self) -> LoadGenerator:
        if self._processes > 1:
            context = multiprocessing.get_context("spawn")
            everyone = context.Barrier(self._processes)
            self._pool = context.Pool(self._processes, initializer=_keep, initargs=(self._bodies, everyone))
            # One task per process (each waits for all the others): every process has started, so
            # the first run starts on time.
            self._pool.map(_ready, range(self._processes), chunksize=1)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def run(self, url: str, clients: int, max_requests: int, seconds: float) -> Load:
        """``clients`` connections until ``max_requests`` requests or ``seconds`` have passed."""
        if self._pool is None:
            return asyncio.run(_drive(url, self._bodies, clients, max_requests, seconds, time.time()))
        start_at = time.time() + 0.2  # every process starts sending at once
        jobs = [
            (url, clients // self._processes + (i < clients % self._processes), max_requests // self._processes,
             seconds, start_at)
            for i in range(self._processes)
        ]
        loads = self._pool.map(_drive_here, jobs)
        return Load(
            [latency for load in loads for latency in load.latencies],
            sum(load.errors for load in loads),
            max(load.seconds for load in loads),
            max(load.busiest_client_share for load in loads),
        )


# A client process's copies, set once when it starts.
_bodies: list[bytes] = []
_everyone: threading.Barrier | None = None


def _keep(bodies: list[bytes], everyone: threading.Barrier) -> None:
    global _bodies, _everyone
    _bodies, _everyone = bodies, everyone


def _ready(_: int) -> None:
    """Returns once every client process has started (a process blocked here takes no other task)."""
    assert _everyone is not None
    _everyone.wait()


def _drive_here(job: tuple[str, int, int, float, float]) -> Load:
    url, clients, max_requests, seconds, start_at = job
    return asyncio.run(_drive(url, _bodies, clients, max_requests, seconds, start_at))


async def _drive(
    url: str, bodies: list[bytes], clients: int, max_requests: int, seconds: float, start_at: float
) -> Load:
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    requests = [request_head(f"{host}:{port}", len(body)) + body for body in bodies]
    latencies: list[float] = []
    counter = itertools.count()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + seconds

    async def client() -> int:
        """One keep-alive connection (reopened when the server closes it or it breaks); the number
        of requests answered with anything but 200, or not answered at all."""
        errors = 0
        connection = None
        try:
            while time.perf_counter() < deadline:
                index = next(counter)
                if index >= max_requests:
                    break
                sent = time.perf_counter()
                try:
                    connection = connection or await asyncio.open_connection(host, port)
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        status, keep_alive = await exchange(*connection, requests[index % len(requests)])
                except (OSError, EOFError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                    status, keep_alive = None, False
                if status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1
                if not keep_alive and connection is not None:
                    connection[1].close()
                    connection = None
        finally:
            if connection is not None:
                connection[1].close()
        return errors

    errors = await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return Load(latencies, sum(errors), elapsed, (time.process_time() - cpu_started) / elapsed)


def request_head(host: str, content_length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request and read its response whole: its status, and whether the connection stays open.

    The service always sends Content-Length; a response without one is a ``ValueError``."""
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
    if "content-length" not in fields:
        raise ValueError(f"a response without Content-Length: {head[0]!r}")
    await reader.readexactly(int(fields["content-length"]))
    return int(head[0].split(" ", 2)[1]), fields.get("connection", "").lower() != "close"
