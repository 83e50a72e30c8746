"""A worker's side of the model process: its connection, with a deadline on every call.

A worker (``service.context``) runs :class:`HostedModelRunner` in place of
:class:`~service.runtime.inference.ModelRunner`; the parent's watchdog (``service.runtime.model_process``) pings
through a :class:`ModelProcessClient` of its own. Deadlines: a run or a ping
``MIXOE_MODEL_PROCESS_TIMEOUT_S``, a load (which includes the warm-up) ``_LOAD_TIMEOUT_S``; every
send and every receive on the socket is bounded by the first as well, the handshake included, so
a stopped peer holds no thread longer. A call past its deadline fails with a 504
(:class:`~service.api.errors.DeadlineExceeded`) and keeps the connection: calls are numbered
(:mod:`service.runtime.protocol`), so its late answer is recognised and thrown away. A broken connection
fails with a 503 and is dropped; the next call reconnects.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import time
from multiprocessing.connection import Connection
from typing import TypeVar

from models.runtime import Bundle
from service.api.errors import DeadlineExceeded, ErrorCode, ModelFailure, NotReady
from service.runtime.inference import ImageJob, ImageVerdict
from service.runtime.protocol import (
    Answer, Call, Failed, Judged, Load, Loaded, ModelKey, Ping, Pong, Reply, Request, Run, model_key,
)

ADDRESS_VARIABLE = "_MIXOE_MODEL_PROCESS_ADDRESS"
KEY_VARIABLE = "_MIXOE_MODEL_PROCESS_KEY"
"""Where the parent tells its workers to connect (``service.runtime.model_process``)."""
_LOAD_TIMEOUT_S = 120.0  # a load includes the warm-up: one batch per padded size, about 2 s each on a GPU
ReplyT = TypeVar("ReplyT", Loaded, Judged, Pong)


class HostedModelRunner:
    """What a worker runs in place of :class:`~service.runtime.inference.ModelRunner`: the same calls,
    carried out by the model process. A verdict is ``None`` for a JPEG the model process could not
    decode (see the module docstring)."""

    def __init__(self, client: ModelProcessClient, bundle: Bundle):
        self._client = client
        self._key = model_key(bundle)
        self._loaded: Loaded | None = None  # known once warm_up has asked the model process

    def __call__(self, jobs: list[ImageJob]) -> list[ImageVerdict | None]:
        images = [job.pixels if isinstance(job.pixels, bytes) else job.pixels.numpy() for job in jobs]
        run = Run(self._key, images, [job.operating_point for job in jobs], [job.top_k for job in jobs])
        return self._client.run(run)

    def warm_up(self) -> None:
        """Have the model process load (and warm up) this model, unless another worker did."""
        self._loaded = self._client.load(self._key)

    @property
    def decodes_jpeg(self) -> bool:
        """Whether to send plain JPEGs undecoded (false until :meth:`warm_up`)."""
        return self._loaded is not None and self._loaded.decodes_jpeg

    def batch_limit(self, configured: int) -> int:
        """``configured``, or the model process's smaller limit for this model (its warm-up's timings)."""
        return configured if self._loaded is None else min(configured, self._loaded.batch_limit)


class ModelProcessClient:
    """A worker's connection to the model process, opened on first use; one thread at a time.

    Every call has a deadline (``timeout_s`` for a run or a ping). A call that misses it, or whose
    connection breaks, sets :attr:`answering` false until a later call succeeds; a broken
    connection is dropped. It remembers the models it loaded: after a reconnection it loads them
    again first (within the deadline of the call that reconnects), since the model process counts
    its users per connection."""

    def __init__(self, address: str, key: bytes, timeout_s: float):
        self._address = address
        self._key = key
        self._timeout_s = timeout_s
        self._connection: Connection | None = None
        self._loaded: set[ModelKey] = set()
        self._calls = itertools.count()
        self.answering = True

    @classmethod
    def from_environment(cls, timeout_s: float) -> ModelProcessClient:
        address, key = os.environ.get(ADDRESS_VARIABLE), os.environ.get(KEY_VARIABLE)
        if not address or not key:
            raise RuntimeError(
                "MIXOE_MODEL_PROCESS is set but no model process is running: mixoe-serve starts it "
                f"(the app found no {ADDRESS_VARIABLE} / {KEY_VARIABLE})"
            )
        return cls(address, bytes.fromhex(key), timeout_s)

    def load(self, model: ModelKey) -> Loaded:
        """Load ``model`` in the model process; its answer says whether to send it plain JPEGs
        undecoded, and how many images a run may hold."""
        loaded = self._call(Load(model), Loaded, _LOAD_TIMEOUT_S)
        self._loaded.add(model)
        return loaded

    def run(self, run: Run) -> list[ImageVerdict | None]:
        """The verdicts of ``run`` (the batcher checks that there is one per image)."""
        return self._call(run, Judged, self._timeout_s).verdicts

    def ping(self) -> None:
        """Return once the model process's batch loop has answered (within the deadline)."""
        self._call(Ping(), Pong, self._timeout_s)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call(self, request: Request, expected: type[ReplyT], timeout_s: float) -> ReplyT:
        deadline = time.monotonic() + timeout_s
        if self._connection is None:
            self._connection = self._connect(deadline)
        reply = self._exchange(self._connection, request, deadline)
        self.answering = True
        if isinstance(reply, Failed):
            raise ModelFailure(ErrorCode.INTERNAL_ERROR, f"the model process failed: {reply.message}")
        if not isinstance(reply, expected):
            self._drop(self._connection)
            raise ModelFailure(ErrorCode.INTERNAL_ERROR, f"the model process answered {reply!r:.80} to {request!r:.80}")
        return reply

    def _connect(self, deadline: float) -> Connection:
        try:
            connection = _open(self._address, self._key, self._timeout_s)
        except (EOFError, OSError, multiprocessing.AuthenticationError) as error:
            self.answering = False
            raise _not_answering(error) from None
        try:
            for model in self._loaded:
                if not isinstance(self._exchange(connection, Load(model), deadline), Loaded):
                    raise _not_answering(RuntimeError(f"could not load {model[0]} again after reconnecting"))
        except BaseException:
            self._drop(connection)
            raise
        return connection

    def _exchange(self, connection: Connection, request: Request, deadline: float) -> Reply:
        """Send ``request`` and wait until ``deadline`` (``time.monotonic``) for its answer,
        throwing away late answers to earlier calls; sending, and reading an answer that has begun
        to arrive, are bounded by the socket's own timeouts (:func:`_open`)."""
        number = next(self._calls)
        try:
            connection.send(Call(number, request))
            while connection.poll(max(0.0, deadline - time.monotonic())):
                answer: Answer = connection.recv()
                if answer.number == number:
                    return answer.reply
        except (EOFError, OSError) as error:
            self._drop(connection)
            raise _not_answering(error) from None
        self.answering = False
        raise DeadlineExceeded(
            ErrorCode.MODEL_TIMEOUT, f"the model process did not answer a {type(request).__name__} call by its deadline"
        )

    def _drop(self, connection: Connection) -> None:
        """Forget a connection whose next message cannot be trusted to answer the next call."""
        connection.close()
        if connection is self._connection:
            self._connection = None
        self.answering = False


def _open(address: str, key: bytes, timeout_s: float) -> Connection:
    """An authenticated connection whose every send and receive fails (``OSError``) after
    ``timeout_s`` without progress, so that a stalled peer blocks no call for longer: kernel
    socket timeouts (``settimeout`` would make the socket non-blocking, which
    :class:`~multiprocessing.connection.Connection` does not expect)."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.setblocking(True)
        set_timeouts(raw, timeout_s)
        raw.connect(address)
        connection = Connection(raw.detach())
    try:
        multiprocessing.connection.answer_challenge(connection, key)
        multiprocessing.connection.deliver_challenge(connection, key)
    except BaseException:
        connection.close()
        raise
    return connection


def set_timeouts(
    raw: socket.socket, timeout_s: float, options: tuple[int, ...] = (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
) -> None:
    """Kernel timeouts on ``raw``'s blocking calls (``0``: none)."""
    seconds = int(timeout_s)
    packed = struct.pack("ll", seconds, int((timeout_s - seconds) * 1_000_000))
    for option in options:
        raw.setsockopt(socket.SOL_SOCKET, option, packed)


def _not_answering(error: BaseException) -> NotReady:
    """A 503: the client retries, by which time a restarted service may answer."""
    return NotReady(ErrorCode.NOT_READY, f"the model process is not answering ({error!r})")
