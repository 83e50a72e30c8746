"""One process that holds the models on the device and runs the batches of every worker together.

With ``MIXOE_WORKERS=N`` each worker otherwise holds its own copy of every model and sends the
device its own small batches. On an H200, four such workers kept the GPU 56-83 % busy at 0.35 of
the raw model rate: four CUDA contexts took turns with batches of a few images each. With
``MIXOE_MODEL_PROCESS=true`` the workers keep HTTP, input checks, decoding and micro-batching (on
the CPU) and hand each batch of images to this process over a Unix socket; it merges what
arrives from all of them into batches of up to ``max_batch_size`` images, runs them with the same
:class:`~service.inference.ModelRunner` (so verdicts are the in-process ones), and answers each
worker with its share.

Protocol: pickled tuples over :mod:`multiprocessing.connection`, one call at a time per
connection (a worker's single inference thread owns its connection):

* ``("load", path)`` -> ``("ok", decodes_jpeg)``: load and warm up the bundle unless it is loaded
  already; ``decodes_jpeg`` says whether to send plain JPEGs undecoded (see below);
* ``("run", path, images, targets, top_ks)`` -> ``("ok", verdicts)``: image ``i`` judged at
  operating point ``targets[i]`` with ``top_ks[i]`` classes; each image a uint8 crop (3, S, S)
  as a numpy array, or a plain JPEG's bytes; a verdict is ``None`` where the JPEG decoder refused
  the file (the worker then lets PIL, the reference decoder, decide: see ``service.predictor``);
* any failure -> ``("error", message)``.

On a GPU (and ``MIXOE_GPU_JPEG_DECODE``, the default) workers send plain JPEGs undecoded: this
process decodes each batch's JPEGs in one nvjpeg call and resizes them on the GPU, so the workers'
CPUs only parse requests and check headers.

A bundle stays loaded while a connected worker has loaded it; when the last such worker
disconnects (a SIGHUP roll-over to new versions retires the old workers) it is released.

The parent (``mixoe-serve``) starts this process before any worker (:class:`ModelProcess`) and
tells the workers where to connect through two environment variables; if it dies, the parent
stops the service with a non-zero status, so that a supervisor restarts the whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import secrets
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

import numpy as np
import torch
from prometheus_client import Histogram
from torch import Tensor

from models.bundle import Bundle, load_bundle
from models.nets import resolve_device
from service.errors import ErrorCode, NotReady
from service.inference import ImageJob, ImageVerdict, ModelRunner, padded_batch_sizes, stack_on
from service.jpeg import decode_plain_jpegs
from service.logs import configure_logging
from service.metrics import model_process_batch_size
from service.settings import Settings

logger = logging.getLogger("mixoe.model_process")

ADDRESS_VARIABLE = "_MIXOE_MODEL_PROCESS_ADDRESS"
KEY_VARIABLE = "_MIXOE_MODEL_PROCESS_KEY"
_START_TIMEOUT_S = 120.0


class Replies(Protocol):
    """Where a task's answer goes: a worker's connection (anything with ``send``, in tests)."""

    def send(self, obj: Any) -> None: ...


@dataclass(frozen=True)
class Task:
    """One message from a worker, or ``("release",)`` once that worker has disconnected."""

    origin: Replies
    message: tuple[Any, ...]

    @property
    def kind(self) -> str:
        return self.message[0]

    @property
    def path(self) -> str:
        return self.message[1]

    @property
    def images(self) -> int:
        return len(self.message[2]) if self.kind == "run" else 0


class ModelHost:
    """The model process's inference loop: loads bundles on request, merges runs into batches.

    Every task goes through one queue and one thread (:meth:`serve_forever`), so the device sees
    one batch at a time, as it does in a single-process server."""

    def __init__(
        self,
        device: torch.device,
        max_batch_size: int,
        batch_sizes: Histogram | None = None,
        decodes_jpeg: bool = False,
    ):
        self._device = device
        self._max_batch_size = max_batch_size
        self._batch_sizes = batch_sizes
        self._decodes_jpeg = decodes_jpeg
        self._tasks: queue.Queue[Task] = queue.Queue()
        self._deferred: deque[Task] = deque()  # taken from the queue but not part of the last batch
        self._runners: dict[str, ModelRunner] = {}
        self._users: dict[str, set[Replies]] = {}

    def submit(self, task: Task) -> None:
        self._tasks.put(task)

    def serve_forever(self) -> None:
        while True:
            self.step()

    def step(self) -> None:
        """Take the next task (waiting for one) and carry it out; a run takes the runs behind it along."""
        task = self._deferred.popleft() if self._deferred else self._tasks.get()
        if task.kind == "run":
            self._run(self._gather(task))
        elif task.kind == "load":
            self._answer(task.origin, self._load, task.origin, task.path)
        elif task.kind == "release":
            self._release(task.origin)
        else:
            task.origin.send(("error", f"unknown request {task.kind!r}"))

    @property
    def loaded(self) -> list[str]:
        return list(self._runners)

    def _gather(self, first: Task) -> list[Task]:
        """``first`` and the runs already queued behind it for the same model, up to
        ``max_batch_size`` images in all. It stops at the first task that does not join, which
        goes next: no task overtakes another."""
        batch = [first]
        images = first.images
        while images < self._max_batch_size:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task.kind == "run" and task.path == first.path and images + task.images <= self._max_batch_size:
                batch.append(task)
                images += task.images
            else:
                self._deferred.append(task)
                break
        return batch

    def _run(self, batch: list[Task]) -> None:
        try:
            runner = self._runners.get(batch[0].path)
            if runner is None:
                raise RuntimeError(f"bundle {batch[0].path} is not loaded (send a load request first)")
            crops = self._crops(runner.bundle, [image for task in batch for image in task.message[2]])
            points = [runner.bundle.operating_point(target) for task in batch for target in task.message[3]]
            top_ks = [top_k for task in batch for top_k in task.message[4]]
            rows = [row for row, crop in enumerate(crops) if crop is not None]
            verdicts: list[ImageVerdict | None] = [None] * len(crops)
            if rows:
                decided = runner.run(
                    stack_on(self._device, [cast(Tensor, crops[row]) for row in rows]),
                    [points[row] for row in rows],
                    [top_ks[row] for row in rows],
                )
                for row, verdict in zip(rows, decided, strict=True):
                    verdicts[row] = verdict
        except Exception as error:
            logger.exception("batch of %d requests failed", len(batch))
            for task in batch:
                _send(task.origin, ("error", f"{type(error).__name__}: {error}"))
            return
        if self._batch_sizes is not None and rows:
            self._batch_sizes.observe(len(rows))
        start = 0
        for task in batch:
            _send(task.origin, ("ok", verdicts[start : start + task.images]))
            start += task.images

    def _crops(self, bundle: Bundle, images: list[np.ndarray | bytes]) -> list[Tensor | None]:
        """Each image as the model's uint8 crop: arrays as they came, JPEGs decoded here in one
        call and resized on the device; ``None`` for a JPEG the decoder refused."""
        crops: list[Tensor | None] = [None if isinstance(image, bytes) else torch.from_numpy(image) for image in images]
        jpeg_rows = [row for row, image in enumerate(images) if isinstance(image, bytes)]
        decoded = decode_plain_jpegs([cast(bytes, images[row]) for row in jpeg_rows], self._device)
        for row, pixels in zip(jpeg_rows, decoded, strict=True):
            crops[row] = None if pixels is None else bundle.pixels(pixels)
        return crops

    def _load(self, origin: Replies, path: str) -> bool:
        if path not in self._runners:
            started = time.perf_counter()
            bundle = load_bundle(Path(path), self._device)
            padded = padded_batch_sizes(self._max_batch_size) if self._device.type == "cuda" else None
            runner = ModelRunner(bundle, padded)
            runner.warm_up()
            self._runners[path] = runner
            logger.info(
                "model process loaded %s:%s from %s on %s (warm-up %.1f s)",
                bundle.name, bundle.version, path, self._device, time.perf_counter() - started,
            )
        self._users.setdefault(path, set()).add(origin)
        return self._decodes_jpeg

    def _release(self, origin: Replies) -> None:
        for path in [path for path, users in self._users.items() if origin in users]:
            self._users[path].discard(origin)
            if not self._users[path]:
                del self._users[path], self._runners[path]
                logger.info("model process released %s: no worker uses it any more", path)
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()

    @staticmethod
    def _answer(origin: Replies, work: Any, *args: Any) -> None:
        try:
            result = work(*args)
        except Exception as error:
            logger.exception("request failed in the model process")
            _send(origin, ("error", f"{type(error).__name__}: {error}"))
        else:
            _send(origin, ("ok", result))


def _send(origin: Replies, reply: tuple[str, Any]) -> None:
    """Answer a worker; one that has gone away meanwhile is released when its reader sees it."""
    try:
        origin.send(reply)
    except OSError:
        pass


class HostedModelRunner:
    """What a worker runs in place of :class:`ModelRunner`: the same calls, carried out by the model process.

    A verdict is ``None`` for a JPEG the model process could not decode (see the module docstring)."""

    def __init__(self, client: ModelProcessClient, bundle: Bundle):
        self._client = client
        self._path = str(bundle.path.resolve())
        self.decodes_jpeg = False  # known once warm_up has asked the model process

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict | None]:
        images = [job.pixels if isinstance(job.pixels, bytes) else job.pixels.numpy() for job in jobs]
        targets = [job.operating_point.target_id_acceptance for job in jobs]
        return self._client.call(("run", self._path, images, targets, [job.top_k for job in jobs]))

    def warm_up(self) -> None:
        """Have the model process load (and warm up) this bundle, unless another worker did."""
        self.decodes_jpeg = self._client.call(("load", self._path))


class ModelProcessClient:
    """A worker's connection to the model process, opened on first use; one thread at a time."""

    def __init__(self, address: str, key: bytes):
        self._address = address
        self._key = key
        self._connection: Connection | None = None

    @classmethod
    def from_environment(cls) -> ModelProcessClient:
        address, key = os.environ.get(ADDRESS_VARIABLE), os.environ.get(KEY_VARIABLE)
        if not address or not key:
            raise RuntimeError(
                "MIXOE_MODEL_PROCESS is set but no model process is running: mixoe-serve starts it "
                f"(the app found no {ADDRESS_VARIABLE} / {KEY_VARIABLE})"
            )
        return cls(address, bytes.fromhex(key))

    def call(self, message: tuple[Any, ...]) -> Any:
        try:
            if self._connection is None:
                self._connection = Client(self._address, family="AF_UNIX", authkey=self._key)
            self._connection.send(message)
            status, value = self._connection.recv()
        except (EOFError, OSError) as error:
            self.close()
            raise NotReady(ErrorCode.NOT_READY, f"the model process is not answering ({error!r})") from None
        if status != "ok":
            raise RuntimeError(f"model process: {value}")
        return value

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass(frozen=True)
class _ProcessConfig:
    device: str
    max_batch_size: int
    gpu_jpeg_decode: bool
    log_level: str


class ModelProcess:
    """The parent's handle on the model process: start it, publish its address, notice if it dies.

    :meth:`start` (or entering) starts the process and waits until it listens; :meth:`stop` (or
    leaving) stops it. If it exits while
    the service runs, the parent sends itself SIGTERM (the server drains and stops) and
    :attr:`died` says so, for ``mixoe-serve`` to exit with a failure status."""

    def __init__(self, settings: Settings):
        self._config = _ProcessConfig(
            settings.device, settings.max_batch_size, settings.gpu_jpeg_decode, settings.log_level
        )
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self.died = False

    def __enter__(self) -> ModelProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait until it listens; :class:`RuntimeError` if it does not."""
        # A private directory: only this user can reach the socket; the key authenticates as well.
        self._directory = tempfile.TemporaryDirectory(prefix="mixoe-model-process-")
        address = str(Path(self._directory.name) / "socket")
        key = secrets.token_bytes(32)
        context = multiprocessing.get_context("spawn")
        ready_here, ready_there = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve, args=(self._config, address, key, ready_there), name="mixoe-model-process", daemon=True
        )
        self._process.start()
        ready_there.close()
        if not ready_here.poll(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the model process did not start within {_START_TIMEOUT_S:.0f} s")
        try:
            ready_here.recv()
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
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._directory is not None:
            self._directory.cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _watch(self) -> None:
        assert self._process is not None
        # Waiting on the sentinel, not join(): the process is reaped by stop() alone.
        multiprocessing.connection.wait([self._process.sentinel])
        if not self._stopping.is_set():
            self.died = True
            logger.error(
                "the model process (pid %s) exited with status %s; stopping the service",
                self._process.pid, self._process.exitcode,
            )
            os.kill(os.getpid(), signal.SIGTERM)


def _serve(config: _ProcessConfig, address: str, key: bytes, ready: Connection) -> None:
    """The model process: listen, accept workers, and run their tasks in this thread."""
    configure_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    device = resolve_device(config.device)
    host = ModelHost(
        device,
        config.max_batch_size,
        model_process_batch_size(config.max_batch_size),
        decodes_jpeg=device.type == "cuda" and config.gpu_jpeg_decode,
    )
    listener = Listener(address, family="AF_UNIX", authkey=key)
    logger.info("model process listening on %s, device %s", address, device)
    ready.send(os.getpid())
    ready.close()
    threading.Thread(target=_accept, args=(listener, host), name="mixoe-accept", daemon=True).start()
    host.serve_forever()


def _accept(listener: Listener, host: ModelHost) -> None:
    while True:
        try:
            connection = listener.accept()
        except (OSError, multiprocessing.AuthenticationError) as error:
            logger.warning("model process refused a connection: %r", error)
            continue
        threading.Thread(target=_receive, args=(connection, host), name="mixoe-receive", daemon=True).start()


def _receive(connection: Connection, host: ModelHost) -> None:
    """Queue each message of one worker; once it disconnects, queue its release."""
    try:
        while True:
            host.submit(Task(connection, connection.recv()))
    except (EOFError, OSError):
        host.submit(Task(connection, ("release",)))

