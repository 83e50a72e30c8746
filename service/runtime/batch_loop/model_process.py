"""One process that holds the models on the device and runs the batches of every worker together.

With ``MIXOE_WORKERS=N`` each worker otherwise holds its own copy of every model and sends the
device its own small batches. On an H200, four such workers kept the GPU 56-83 % busy at 0.35 of
the raw model rate: four CUDA contexts took turns with batches of a few images each. With
``MIXOE_MODEL_PROCESS=true`` the workers keep HTTP, input checks and (but for plain JPEGs on a
GPU, see below) decoding, on the CPU, and hand each request's images to this process over a Unix
socket, as soon as they are decoded and with every other request of theirs in flight
(:mod:`service.runtime.hosted`); this process is the one batching point: it merges what arrives
from all of them into batches of up to ``max_batch_size`` images, runs them with the same
:class:`~service.runtime.batch_loop.inference.ModelRunner` (so verdicts are the in-process ones), and answers
each request with its share (:mod:`service.runtime.batch_loop.model_host` is its loop).

Protocol: the typed messages of :mod:`service.runtime.protocol`, framed by
:mod:`service.runtime.framing`, many calls in flight per connection, answers routed back by call
number. Every call has a deadline, kept by the worker's side (:mod:`service.runtime.model_client`);
here a connection's handshake has ``_HANDSHAKE_TIMEOUT_S``, and each answer sent to a worker
``_ANSWER_TIMEOUT_S``, and a run still queued past its call's deadline is dropped unrun. A call
past its deadline fails its request with a 504, a
connection that breaks with a 503; the worker then reports not ready and pings until the model
process answers again (:class:`~service.context.ServiceContext`).

On a GPU with ``MIXOE_GPU_JPEG_DECODE=true`` workers send plain JPEGs undecoded: this
process decodes each batch's JPEGs in one nvjpeg call and resizes them on the GPU, so the workers'
CPUs only parse requests and check headers.

A model stays loaded while a connected worker has loaded it; when the last such worker
disconnects (a SIGHUP roll-over to new versions retires the old workers) it is released.

Lifecycle: the parent (``mixoe-serve``) starts this process before any worker (:class:`ModelProcess`)
and tells the workers where to connect through two environment variables. The process ignores
SIGINT, SIGTERM and SIGHUP, which a terminal, an init system or ``kill`` may send to the whole
process group: the workers are still draining their queues through it then. It exits when the
parent closes the control pipe, which the parent does once the workers have stopped, and the
operating system does if the parent dies. If it dies, or stops answering the parent's
heartbeat (a :class:`~service.runtime.protocol.Ping` every ``HEARTBEAT_INTERVAL_S``, through the loop that runs
the batches) for ``MIXOE_MODEL_PROCESS_TIMEOUT_S`` (the parent then kills it), the parent stops
the service with exit status 1, so that a supervisor restarts the whole: a hang is noticed within
that timeout plus ``HEARTBEAT_INTERVAL_S``. The workers' connections then break, and every request
still waiting on it gets a 503. The model process is not restarted in place: the workers hold
models loaded in it, and a GPU may free a killed process's memory only later.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from models.network.nets import resolve_device
from service.api.errors import ServiceError
from service.monitoring.logs import configure_logging
from service.monitoring.metrics import BatchMetrics
from service.runtime.cpu_threads import batch_loop_threads
from service.runtime.framing import BlockingChannel, authenticated_socket
from service.runtime.model_client import ADDRESS_VARIABLE, KEY_VARIABLE, HostClient, set_timeouts
from service.runtime.batch_loop.host_tasks import Release, Task
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.protocol import Call
from service.settings import Settings

logger = logging.getLogger("mixoe.model_process")

_START_TIMEOUT_S = 120.0
_HANDSHAKE_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
EXIT_GRACE_S = 1.0
_ANSWER_TIMEOUT_S = 1.0  # an answer is a few hundred bytes: a worker that cannot take it in 1 s has stopped reading  # how long a process whose connection broke is given to show its exit


class ModelProcess:
    """The parent's handle on the model process: start it, publish its address, notice if it
    dies or hangs.

    :meth:`start` starts the process and waits until it listens; :meth:`stop` stops it. If it
    exits while the service runs, or misses a heartbeat's deadline (it is then killed),
    ``on_failure`` runs (by default the parent sends itself SIGTERM: the server drains and stops)
    and :attr:`died` says so, for ``mixoe-serve`` to exit with a failure status."""

    def __init__(self, settings: Settings, on_failure: Callable[[], None] | None = None):
        self._settings = settings
        self._on_failure = on_failure or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: Connection | None = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        self._stopping = threading.Event()
        self.died = False

    def start(self) -> None:
        """Start the process and wait until it listens; :class:`RuntimeError` if it does not."""
        # A private directory: only this user can reach the socket; the key authenticates as well.
        self._directory = tempfile.TemporaryDirectory(prefix="mixoe-model-process-")
        address = str(Path(self._directory.name) / "socket")
        key = secrets.token_bytes(32)
        context = multiprocessing.get_context("spawn")
        self._control, control_there = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(self._settings, address, key, control_there), name="mixoe-model-process"
        )
        self._process.start()
        control_there.close()  # from now on only the child holds that end: closing ours tells it to exit
        # At interpreter exit multiprocessing joins its children, and this one would wait for its
        # control pipe to close: a finaliser with a priority runs before that join.
        self._finalizer = multiprocessing.util.Finalize(self, self.stop, exitpriority=100)
        if not self._control.poll(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the model process did not start within {_START_TIMEOUT_S:.0f} s")
        try:
            self._control.recv()
        except EOFError:
            self.stop()
            raise RuntimeError(f"the model process exited at start (status {self._process.exitcode})") from None
        os.environ[ADDRESS_VARIABLE] = address
        os.environ[KEY_VARIABLE] = key.hex()
        heartbeat = HostClient.over_socket(address, key, self._settings.model_process_timeout_s)
        threading.Thread(target=self._watch, args=(heartbeat,), name="mixoe-model-process-watch", daemon=True).start()

    def stop(self) -> None:
        """Stop the process (its workers have stopped: nothing is lost) and forget its address."""
        self._stopping.set()
        os.environ.pop(ADDRESS_VARIABLE, None)
        os.environ.pop(KEY_VARIABLE, None)
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            self._process.join(_STOP_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._directory is not None:
            self._directory.cleanup()
        if self._finalizer is not None:
            self._finalizer.cancel()

    def _watch(self, heartbeat: HostClient) -> None:
        """Until :meth:`stop`: wait ``HEARTBEAT_INTERVAL_S`` for the process to exit, else ping it
        (on an event loop of this thread's own, which the client's connection belongs to)."""
        process = self._process
        assert process is not None
        with asyncio.Runner() as runner:
            what = self._watch_until_failure(process, heartbeat, runner)
            runner.run(heartbeat.close())
        if what is None:
            return
        self.died = True
        logger.error("the model process (pid %s) %s; stopping the service", process.pid, what)
        self._on_failure()

    def _watch_until_failure(
        self, process: multiprocessing.process.BaseProcess, heartbeat: HostClient, runner: asyncio.Runner
    ) -> str | None:
        """What happened to the process, or ``None`` once :meth:`stop` was called."""
        while True:
            # Waiting on the sentinel, not join(): stop() reaps the process.
            exited = multiprocessing.connection.wait([process.sentinel], HEARTBEAT_INTERVAL_S)
            if self._stopping.is_set():
                return None
            if exited:
                process.join(1)  # reaped, for its exit status
                return f"exited with status {process.exitcode}"
            try:
                runner.run(heartbeat.ping())
            except ServiceError as error:
                if self._stopping.is_set():  # stopped meanwhile
                    return None
                # A process that dies while a ping is out breaks the connection as it exits, and
                # its sentinel closes in the same exit: report the death, not a hang.
                if multiprocessing.connection.wait([process.sentinel], EXIT_GRACE_S):
                    process.join(1)
                    return f"exited with status {process.exitcode}"
                process.kill()
                return f"stopped answering ({error.message}), so it was killed"


def _serve(settings: Settings, address: str, key: bytes, control: Connection) -> None:
    """The model process: listen, accept workers, and run their tasks in this thread."""
    configure_logging(settings.log_level)
    for name in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(name, signal.SIG_IGN)  # see the module docstring: the control pipe stops us
    device = resolve_device(settings.device)
    host = ModelHost(
        device,
        settings.max_batch_size,
        BatchMetrics(settings.max_batch_size),
        decodes_jpeg=device.type == "cuda" and settings.gpu_jpeg_decode,
        cuda_graphs=settings.cuda_graphs,
        batch_size_tuning=settings.batch_size_tuning,
        max_delay_s=settings.max_batch_delay_s,
        intra_op_threads=batch_loop_threads(device, settings.model_threads),
    )
    listener = Listener(address, family="AF_UNIX", backlog=64)  # authenticated per connection, in its own thread
    logger.info("model process listening on %s, device %s", address, device)
    control.send(os.getpid())
    threading.Thread(target=_exit_when_closed, args=(control,), name="mixoe-control", daemon=True).start()
    threading.Thread(target=_accept, args=(listener, key, host), name="mixoe-accept", daemon=True).start()
    host.serve_forever()


def _exit_when_closed(control: Connection) -> None:
    try:
        control.recv()
    except (EOFError, OSError):
        pass
    logger.info("model process stopping: the service has stopped")
    os._exit(0)


def _accept(listener: Listener, key: bytes, host: ModelHost) -> None:
    while True:
        try:
            connection = listener.accept()
        except OSError as error:  # out of file descriptors, say: try again shortly
            logger.warning("model process could not accept a connection: %r", error)
            time.sleep(0.1)
            continue
        threading.Thread(target=_receive, args=(connection, key, host), name="mixoe-receive", daemon=True).start()


def _receive(connection: Connection, key: bytes, host: ModelHost) -> None:
    """Authenticate one worker, then queue each of its messages; once it disconnects, its release.

    The handshake runs here, with a time limit, so a peer that stalls or drops halfway holds up
    no other connection. Each answer to it must be sent within ``_ANSWER_TIMEOUT_S``: a worker
    that stops reading holds the batch loop, and every other worker, no longer (its channel then
    closes, and it reconnects), far less than the heartbeat's deadline."""
    try:
        _limit_receiving(connection, _HANDSHAKE_TIMEOUT_S)
        raw = authenticated_socket(connection, key, initiator=False)
    except (EOFError, OSError, multiprocessing.AuthenticationError) as error:
        logger.warning("model process refused a connection: %r", error)
        connection.close()
        return
    set_timeouts(raw, 0, (socket.SO_RCVTIMEO,))
    set_timeouts(raw, _ANSWER_TIMEOUT_S, (socket.SO_SNDTIMEO,))
    channel = BlockingChannel(raw)
    try:
        while True:
            message = channel.receive()
            if not (isinstance(message, Call) and message.valid):
                raise ValueError(f"not a call: {message!r:.80}")
            host.submit(Task(channel, message.request, message.number, message.deadline))
    except (EOFError, OSError):
        pass
    except Exception:
        logger.exception("model process dropped a worker's connection")
    host.submit(Task(channel, Release()))  # the loop closes the channel: it writes to it


def _limit_receiving(connection: Connection, timeout_s: float) -> None:
    """A receive timeout on ``connection``'s socket, through a socket object over its descriptor
    that is detached afterwards (the descriptor stays the connection's)."""
    raw = socket.socket(fileno=connection.fileno())
    try:
        raw.setblocking(True)  # creating the object may make the shared file description non-blocking
        set_timeouts(raw, timeout_s, (socket.SO_RCVTIMEO,))
    finally:
        raw.detach()
