"""``python -m service`` as a child process on a free loopback port.

Benchmarks and tests that need the real server (TCP, uvicorn, signals, the JSON log) rather than
the in-process app start it here, so there is one way to pass settings, to wait until it is ready
and to shut it down gracefully. The helpers for waiting and stopping also serve the other child
processes those callers run beside it (Prometheus).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.monitoring.metrics import MULTIPROCESS_DIRECTORY_VARIABLE
from service.settings import is_setting_variable

ROOT = Path(__file__).resolve().parents[1]


class LocalProcessError(RuntimeError):
    """A child process exited or did not become ready; the message ends with its log."""


@dataclass(frozen=True)
class LocalServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout_s: float = 30.0) -> int:
        return stop_process(self.process, timeout_s)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_local_server(settings: Mapping[str, str], log: Path, timeout_s: float = 120.0) -> LocalServer:
    """Start the service with ``settings`` (``Settings`` field names, e.g. ``device``) and wait for ready.

    Ready means every worker has started (``workers`` > 1: one ready worker would take all the
    traffic while the others load; their info-level start-up lines in ``log`` tell, so a higher
    ``log_level`` is refused then). The parent's own ``MIXOE_*`` and ``PROMETHEUS_MULTIPROC_DIR``
    variables are not inherited, so only ``settings`` apply; host and port are chosen here. stdout
    and stderr go to ``log``.
    """
    workers = int(settings.get("workers", "1"))
    if workers > 1 and settings.get("log_level", "info") not in ("info", "debug"):
        raise ValueError("workers are seen starting in their info-level log: log_level must be info or debug")
    port = free_port()
    environment = {
        key: value
        for key, value in os.environ.items()
        if not is_setting_variable(key) and key != MULTIPROCESS_DIRECTORY_VARIABLE
    }
    environment |= {f"MIXOE_{key.upper()}": value for key, value in settings.items()}
    environment |= {"MIXOE_HOST": "127.0.0.1", "MIXOE_PORT": str(port)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=sink, stderr=sink)
    server = LocalServer(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout_s
        wait_until_ok(f"{server.url}/v2/health/ready", process, log, timeout_s)
        while workers > 1 and len(started_workers(log)) < workers:
            if process.poll() is not None or time.monotonic() > deadline:
                raise LocalProcessError(
                    f"{len(started_workers(log))} of {workers} workers started (exit status "
                    f"{process.returncode}):\n{_tail(log)}"
                )
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    return server


def log_entries(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines the server has written to ``log`` so far, but a last one still being written."""
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def started_workers(log: Path) -> set[int]:
    """The pids of the server processes whose log lines in ``log`` say they started serving."""
    return {entry["pid"] for entry in log_entries(log) if entry["message"] == "Application startup complete."}


def wait_until_ok(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalProcessError(f"{process.args[0]} exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise LocalProcessError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{_tail(log)}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM (a graceful drain for the service), SIGKILL after ``timeout_s``; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _tail(log: Path, characters: int = 3000) -> str:
    return log.read_text(errors="replace")[-characters:] if log.exists() else "(no log)"
