"""One process that holds the models on the device and runs the batches of every worker together.

With ``MIXOE_WORKERS=N`` each worker otherwise holds its own copy of every model and sends the
device its own small batches. On an H200, four such workers kept the GPU 56-83 % busy at 0.35 of
the raw model rate: four CUDA contexts took turns with batches of a few images each. With
``MIXOE_MODEL_PROCESS=true`` the workers keep HTTP, input checks, micro-batching and (but for
plain JPEGs on a GPU, see below) decoding, on the CPU, and hand each batch of images to this
process over a Unix socket; it merges what
arrives from all of them into batches of up to ``max_batch_size`` images, runs them with the same
:class:`~service.inference.ModelRunner` (so verdicts are the in-process ones), and answers each
worker with its share (:mod:`service.model_host` is its loop).

Protocol: pickled tuples over :mod:`multiprocessing.connection`, one call at a time per
connection (a worker's single inference thread owns its connection):

* ``("load", key)`` -> ``("ok", decodes_jpeg)``: load and warm up the model unless it is loaded
  already (``key``: :func:`~service.model_host.model_key`); ``decodes_jpeg`` says whether to send
  plain JPEGs undecoded (see below);
* ``("run", key, images, targets, top_ks)`` -> ``("ok", verdicts)``: image ``i`` judged at
  operating point ``targets[i]`` with ``top_ks[i]`` classes; each image a uint8 crop (3, S, S)
  as a numpy array, or a plain JPEG's bytes; a verdict is ``None`` where the JPEG decoder refused
  the file (the worker then lets PIL, the reference decoder, decide: see ``service.predictor``);
* any failure -> ``("error", message)``.

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
operating system does if the parent dies. If it dies, the parent stops the service with exit
status 1, so that a supervisor restarts the whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import secrets
import signal
import socket
import struct
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import torch

from models.nets import resolve_device
from models.runtime import Bundle
from service.errors import ErrorCode, NotReady
from service.inference import ImageJob, ImageVerdict
from service.logs import configure_logging
from service.metrics import model_process_batch_size
from service.model_host import ModelHost, ModelKey, Task, model_key
from service.settings import Settings

logger = logging.getLogger("mixoe.model_process")

ADDRESS_VARIABLE = "_MIXOE_MODEL_PROCESS_ADDRESS"
KEY_VARIABLE = "_MIXOE_MODEL_PROCESS_KEY"
_START_TIMEOUT_S = 120.0
_HANDSHAKE_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_REQUEST_LENGTHS = {("load",): 2, ("run",): 5}  # what a worker may send, and its length


class HostedModelRunner:
    """What a worker runs in place of :class:`~service.inference.ModelRunner`: the same calls,
    carried out by the model process. A verdict is ``None`` for a JPEG the model process could not
    decode (see the module docstring)."""

    def __init__(self, client: ModelProcessClient, bundle: Bundle):
        self._client = client
        self._key = model_key(bundle)
        self.decodes_jpeg = False  # known once warm_up has asked the model process

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict | None]:
        images = [job.pixels if isinstance(job.pixels, bytes) else job.pixels.numpy() for job in jobs]
        targets = [job.operating_point.target_id_acceptance for job in jobs]
        return self._client.call(("run", self._key, images, targets, [job.top_k for job in jobs]))

    def warm_up(self) -> None:
        """Have the model process load (and warm up) this model, unless another worker did."""
        self.decodes_jpeg = self._client.load(self._key)


class ModelProcessClient:
    """A worker's connection to the model process, opened on first use; one thread at a time.

    It remembers the models it loaded: after a reconnection it loads them again first, since the
    model process counts its users per connection."""

    def __init__(self, address: str, key: bytes):
        self._address = address
        self._key = key
        self._connection: Connection | None = None
        self._loaded: set[ModelKey] = set()

    @classmethod
    def from_environment(cls) -> ModelProcessClient:
        address, key = os.environ.get(ADDRESS_VARIABLE), os.environ.get(KEY_VARIABLE)
        if not address or not key:
            raise RuntimeError(
                "MIXOE_MODEL_PROCESS is set but no model process is running: mixoe-serve starts it "
                f"(the app found no {ADDRESS_VARIABLE} / {KEY_VARIABLE})"
            )
        return cls(address, bytes.fromhex(key))

    def load(self, model: ModelKey) -> bool:
        """Load ``model`` in the model process; whether to send it plain JPEGs undecoded."""
        decodes_jpeg = bool(self.call(("load", model)))
        self._loaded.add(model)
        return decodes_jpeg

    def call(self, message: tuple[Any, ...]) -> Any:
        if self._connection is None:
            self._connection = self._connect()
        return self._exchange(self._connection, message)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> Connection:
        try:
            connection = Client(self._address, family="AF_UNIX", authkey=self._key)
        except (EOFError, OSError, multiprocessing.AuthenticationError) as error:
            raise _not_answering(error) from None
        try:
            for model in self._loaded:
                self._exchange(connection, ("load", model))
        except BaseException:
            connection.close()
            raise
        return connection

    def _exchange(self, connection: Connection, message: tuple[Any, ...]) -> Any:
        try:
            connection.send(message)
            status, value = connection.recv()
        except (EOFError, OSError) as error:
            connection.close()
            if connection is self._connection:
                self._connection = None
            raise _not_answering(error) from None
        if status != "ok":
            raise RuntimeError(f"model process: {value}")
        return value


def _not_answering(error: BaseException) -> NotReady:
    """A 503: the client retries, by which time a restarted service may answer."""
    return NotReady(ErrorCode.NOT_READY, f"the model process is not answering ({error!r})")


class ModelProcess:
    """The parent's handle on the model process: start it, publish its address, notice if it dies.

    :meth:`start` starts the process and waits until it listens; :meth:`stop` stops it. If it
    exits while the service runs, the parent sends itself SIGTERM (the server drains and stops)
    and :attr:`died` says so, for ``mixoe-serve`` to exit with a failure status."""

    def __init__(self, settings: Settings):
        self._settings = settings
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
        threading.Thread(target=self._watch, name="mixoe-model-process-watch", daemon=True).start()

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

    def _watch(self) -> None:
        assert self._process is not None
        # Waiting on the sentinel, not join(): stop() reaps the process.
        multiprocessing.connection.wait([self._process.sentinel])
        if self._stopping.is_set():
            return
        self.died = True
        self._process.join(1)  # reaped, for its exit status
        logger.error(
            "the model process (pid %s) exited with status %s; stopping the service",
            self._process.pid, self._process.exitcode,
        )
        os.kill(os.getpid(), signal.SIGTERM)


def _serve(settings: Settings, address: str, key: bytes, control: Connection) -> None:
    """The model process: listen, accept workers, and run their tasks in this thread."""
    configure_logging(settings.log_level)
    for name in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(name, signal.SIG_IGN)  # see the module docstring: the control pipe stops us
    device = resolve_device(settings.device)
    if device.type == "cuda":
        # This process's CPU work is stacking crops and feeding the GPU: the cores are the workers'.
        torch.set_num_threads(1)
    host = ModelHost(
        device,
        settings.max_batch_size,
        model_process_batch_size(settings.max_batch_size),
        decodes_jpeg=device.type == "cuda" and settings.gpu_jpeg_decode,
        cuda_graphs=settings.cuda_graphs,
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
    no other connection."""
    try:
        with socket.socket(fileno=os.dup(connection.fileno())) as raw:
            # A receive timeout on the socket itself (settimeout would make the shared file
            # description non-blocking, and so may creating this object: undone at once): a
            # stalled read fails with an OSError.
            raw.setblocking(True)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(_HANDSHAKE_TIMEOUT_S), 0))
            multiprocessing.connection.deliver_challenge(connection, key)
            multiprocessing.connection.answer_challenge(connection, key)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    except (EOFError, OSError, multiprocessing.AuthenticationError) as error:
        logger.warning("model process refused a connection: %r", error)
        connection.close()
        return
    try:
        while True:
            message = connection.recv()
            if not (isinstance(message, tuple) and _REQUEST_LENGTHS.get(message[:1]) == len(message)):
                raise ValueError(f"not a request: {message!r:.80}")
            host.submit(Task(connection, message))
    except (EOFError, OSError):
        pass
    except Exception:
        logger.exception("model process dropped a worker's connection")
    host.submit(Task(connection, ("release",)))  # the loop closes the connection: it writes to it

