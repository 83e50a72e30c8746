"""Several server processes on one listening socket (``MIXOE_WORKERS`` > 1, or a model process).

Built on uvicorn's public API only: the parent binds the socket (``Config.bind_socket``) and each
spawned worker runs a :class:`~service.server.DrainingServer` on it (``Server.run(sockets=...)``).
Each worker tells the supervisor over a pipe that it serves (its app built, its lifespan started)
or why it could not start. Start-up failure is therefore decided from what the worker says, not
guessed from health checks that a slow start on a loaded machine can miss: a worker that reports a
failure, exits before it serves, or stays silent for the start-up timeout failed to start.

- At start, and when a worker that served has died and is replaced, a start-up failure stops
  every worker and :meth:`Supervisor.run` returns uvicorn's ``STARTUP_FAILURE`` (3): a bad bundle
  fails every new worker the same way, so restarting it would only loop.
- SIGTERM or SIGINT: every worker drains (as a single server does) and ``run`` returns 0; a worker
  still running ``stop_timeout_s`` later is stuck in its drain, and is killed.
- SIGHUP: the workers are replaced one at a time, each new one serving before an old one stops,
  so new bundle versions go live without a refused request. If a new one cannot start, the
  roll-over stops and the workers still running keep serving.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from service.server import DrainingServer

logger = logging.getLogger("mixoe.supervisor")

_READY = "ready"
_FAILED = "failed"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupFailure(Exception):
    """A worker did not start serving; the message says which and why."""


class _ReportingServer(DrainingServer):
    """A worker's server that reports over ``reports`` once it serves."""

    def __init__(self, config: uvicorn.Config, reports: Connection):
        super().__init__(config)
        self._reports = reports

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the lifespan started and the socket is served
            self._reports.send((_READY, ""))


def _work(config: uvicorn.Config, sockets: list[socket.socket], reports: Connection) -> None:
    """A worker process: serve ``config``'s app on ``sockets`` until SIGTERM; say why if it cannot start."""
    config.configure_logging()  # the config came pickled: its constructor, which does this, did not run here
    server = _ReportingServer(config, reports)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down
        pass
    except BaseException as error:
        if server.started:
            raise
        if isinstance(error, SystemExit) and error.code == STARTUP_FAILURE:
            reason = "it could not load or start its application (see its log)"  # uvicorn has logged why
        else:
            logger.exception("worker %d could not start", os.getpid())
            reason = f"{type(error).__name__}: {error}"
        reports.send((_FAILED, reason))
        raise SystemExit(STARTUP_FAILURE) from None


class _Worker:
    """The supervisor's handle on one worker process: started, then serving or failed."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], start_timeout_s: float):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or locks
        self.reports, writer = context.Pipe(duplex=False)
        self.process: BaseProcess = context.Process(target=_work, args=(config, sockets, writer), name="mixoe-worker")
        self.process.start()
        writer.close()  # the worker holds the only writer now
        self.serving = False
        self._start_timeout_s = start_timeout_s
        self._deadline = time.monotonic() + start_timeout_s
        logger.info("Started worker process [%d]", self.pid)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def waitables(self) -> list[object]:
        """What becomes ready when this worker reports or exits."""
        return [self.reports, self.process.sentinel]

    def seconds_left(self) -> float:
        """Until this worker's start-up deadline."""
        return max(0.0, self._deadline - time.monotonic())

    def check_start(self) -> None:
        """Take in the worker's reports; :class:`StartupFailure` if it cannot or did not start in time."""
        exited = not self.process.is_alive()  # first: once it has exited, all it sent is in the pipe
        while not self.serving and self.reports.poll():
            try:
                kind, detail = self.reports.recv()
            except EOFError:
                break
            if kind == _READY:
                self.serving = True
            else:
                raise StartupFailure(f"worker [{self.pid}] failed to start: {detail}")
        if self.serving:
            return
        if exited:
            raise StartupFailure(f"worker [{self.pid}] exited with status {self.process.exitcode} before it served")
        if self.seconds_left() == 0:
            raise StartupFailure(f"worker [{self.pid}] was not serving within {self._start_timeout_s:g} s")

    def stop(self) -> None:
        """Ask it to stop. One that serves drains (SIGTERM: it stops accepting and answers what it
        accepted); one still starting has nothing to drain and may be stuck (uvicorn holds SIGTERM
        until the lifespan has started), so it is killed."""
        if not self.process.is_alive():
            return
        if self.serving:
            self.process.terminate()
        else:
            self.process.kill()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until it has exited; one still running after ``timeout_s`` is killed (``False``)."""
        self.process.join(timeout_s)
        in_time = not self.process.is_alive()
        if not in_time:
            self.process.kill()
            self.process.join()
        self.reports.close()
        return in_time


class Supervisor:
    """Run ``workers`` processes serving ``config``'s app on one socket; see the module docstring.

    ``config.app`` must be an import string (workers are spawned and import it), with
    ``factory=True`` for an app factory."""

    def __init__(self, config: uvicorn.Config, workers: int, start_timeout_s: float, stop_timeout_s: float | None = None):
        self._config = config
        self._count = workers
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s  # None: wait for a draining worker however long it takes
        self._sockets: list[socket.socket] = []
        self._workers: list[_Worker] = []
        self._signals: set[int] = set()  # received, not yet acted on
        self._wakeup, self._wakeup_writer = socket.socketpair()

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (0) or a start-up failure (``STARTUP_FAILURE``)."""
        self._sockets = [self._config.bind_socket()]
        try:
            with self._signals_captured():
                self._workers = self._start(self._count)
                while not self._stop_requested():
                    self._replace_dead()
                    if signal.SIGHUP in self._signals:
                        self._signals.discard(signal.SIGHUP)
                        self._roll()
                    elif not self._stop_requested():
                        wait([self._wakeup, *[worker.process.sentinel for worker in self._workers]])
                        self._receive_signals()
        except StartupFailure as failure:
            logger.error("%s; stopping the server", failure)
            return STARTUP_FAILURE
        finally:
            self._stop(self._workers)
            for listening in self._sockets:
                listening.close()
            self._wakeup.close()
            self._wakeup_writer.close()
        return 0

    def _start(self, count: int) -> list[_Worker]:
        """Start ``count`` workers and wait until each serves, or until a stop signal.

        :class:`StartupFailure` at the first one that cannot start, the new workers stopped."""
        workers = [_Worker(self._config, self._sockets, self._start_timeout_s) for _ in range(count)]
        try:
            starting = workers
            while starting and not self._stop_requested():
                waitables = [waitable for worker in starting for waitable in worker.waitables()]
                wait([self._wakeup, *waitables], min(worker.seconds_left() for worker in starting))
                self._receive_signals()
                for worker in starting:
                    worker.check_start()
                starting = [worker for worker in starting if not worker.serving]
        except StartupFailure:
            self._stop(workers)
            raise
        return workers

    def _replace_dead(self) -> None:
        """Replace each worker that served and has exited since (killed, or crashed)."""
        for worker in [worker for worker in self._workers if not worker.process.is_alive()]:
            if self._stop_requested():
                return
            worker.join()
            logger.warning("Worker process [%d] died (status %s); starting another", worker.pid, worker.process.exitcode)
            self._workers.remove(worker)
            self._workers.extend(self._start(1))

    def _roll(self) -> None:
        """Replace each worker by a new one, the new one serving before the old one stops."""
        logger.info("Replacing the workers one at a time")
        for old in list(self._workers):
            try:
                new = self._start(1)
            except StartupFailure as failure:
                logger.error("%s; aborting the restart: the running workers keep serving", failure)
                return
            self._workers.extend(new)
            if self._stop_requested():
                return
            self._stop([old])
            self._workers.remove(old)
        logger.info("All workers replaced")

    def _stop(self, workers: list[_Worker]) -> None:
        """Stop ``workers`` together: they drain in parallel, each killed if still running
        ``stop_timeout_s`` after it was asked to stop (stuck in its drain)."""
        for worker in workers:
            worker.stop()
        deadline = None if self._stop_timeout_s is None else time.monotonic() + self._stop_timeout_s
        for worker in workers:
            if not worker.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
                logger.error("Worker process [%d] did not stop within %g s; killed it", worker.pid, self._stop_timeout_s)

    def _stop_requested(self) -> bool:
        return any(received in _STOP_SIGNALS for received in self._signals)

    def _receive_signals(self) -> None:
        """Take in the signals that arrived (their numbers, one byte each, on the wake-up socket)."""
        try:
            while received := self._wakeup.recv(64):
                for number in received:
                    logger.info("Received %s", signal.Signals(number).name)
                    self._signals.add(number)
        except BlockingIOError:
            pass

    @contextmanager
    def _signals_captured(self) -> Iterator[None]:
        """While supervising, SIGTERM, SIGINT and SIGHUP wake the supervisor, which acts on them in
        its own loop (a handler can interrupt it anywhere: it does nothing there)."""
        self._wakeup.setblocking(False)
        self._wakeup_writer.setblocking(False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous_handlers = {number: signal.signal(number, lambda number, frame: None) for number in handled}
        previous_wakeup = signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
