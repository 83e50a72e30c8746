"""A worker's side of the batch loop: one connection, many calls in flight, a deadline on each.

The batch loop (:class:`~service.runtime.batch_loop.model_host.ModelHost`) runs in the model process, reached
over a Unix socket (:meth:`HostClient.over_socket`), or in a thread of a single server
(``service.runtime.batch_loop.local_host``), reached through the event loop; the client is the same. A
worker's requests call it straight from the event loop (``service.runtime.hosted``): each call is
numbered, sent at once, and awaited; one task reads the answers and hands each to the call of its
number. So a worker has as many runs in flight as it has requests, and the batch loop, the one
batching point, merges them with every other worker's. The parent's watchdog
(``service.runtime.batch_loop.model_process``) pings through a client of its own, on an event loop of its
own thread.

Deadlines: a run or a ping ``MIXOE_MODEL_PROCESS_TIMEOUT_S``; a load (which includes the
warm-up), and a reconnection with the reloads it needs, ``LOAD_TIMEOUT_S`` (a single server's own
loop: none). A call carries its deadline, so the batch loop drops a run nobody waits for any
more. A call past its deadline fails with a 504 (:class:`~service.api.errors.DeadlineExceeded`)
and keeps the connection: its late answer finds nobody waiting for its number and is thrown
away. Sending never waits (the transport buffers the frame whole), so no deadline cuts a frame in
half. A broken connection fails every call in flight on it with a 503 and is dropped; the next
call reconnects and loads this worker's models again first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

from models.contract.manifest import BundleError
from service.api.errors import DeadlineExceeded, ErrorCode, ModelFailure, NotReady
from service.runtime.framing import AsyncChannel, ChannelClosed, authenticated_socket
from service.runtime.protocol import Answer, Call, Failed, Judged, Load, Loaded, ModelKey, Ping, Pong, Reply, Request

ADDRESS_VARIABLE = "_MIXOE_MODEL_PROCESS_ADDRESS"
KEY_VARIABLE = "_MIXOE_MODEL_PROCESS_KEY"
"""Where the parent tells its workers to connect (``service.runtime.batch_loop.model_process``)."""
LOAD_TIMEOUT_S = 120.0  # a load includes the warm-up: one batch per padded size, about 2 s each on a GPU
ReplyT = TypeVar("ReplyT", Loaded, Judged, Pong)


class Channel(Protocol):
    """Where calls go and answers come from: a socket (:class:`~service.runtime.framing.AsyncChannel`)
    or a batch loop in this process. ``receive`` raises an ``EOFError`` or ``OSError`` once the
    other end has gone."""

    async def send(self, message: Any) -> None: ...

    async def receive(self) -> Any: ...

    def close(self) -> None: ...


class HostClient:
    """A connection to a batch loop, opened on first use (``connect``), for the event loop that uses it.

    A call that misses its deadline, or whose connection breaks, sets :attr:`answering` false
    until an answer arrives again. It remembers the models it loaded: after a reconnection it
    loads them again first (within the deadline of the call that reconnects), since the batch
    loop counts its users per connection."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Channel]],
        timeout_s: float,
        name: str = "the model process",
        load_timeout_s: float | None = LOAD_TIMEOUT_S,
    ):
        """``name`` is what the errors call the batch loop; ``load_timeout_s`` bounds a load with
        its warm-up, and a reconnection with its reloads (``None``: no bound)."""
        self._connect = connect
        self._load_timeout_s = load_timeout_s
        self.timeout_s = timeout_s
        self.name = name
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()
        self._loaded: set[ModelKey] = set()
        self._numbers = itertools.count()
        self.answering = True

    @classmethod
    def over_socket(cls, address: str, key: bytes, timeout_s: float) -> HostClient:
        """A client of the model process listening at ``address``, authenticated with ``key``."""

        async def connect() -> Channel:
            return await AsyncChannel.over(await asyncio.to_thread(_open, address, key, timeout_s))

        return cls(connect, timeout_s)

    @classmethod
    def from_environment(cls, timeout_s: float) -> HostClient:
        """A client of the model process ``mixoe-serve`` started for this worker."""
        address, key = os.environ.get(ADDRESS_VARIABLE), os.environ.get(KEY_VARIABLE)
        if not address or not key:
            raise RuntimeError(
                "MIXOE_MODEL_PROCESS is set but no model process is running: mixoe-serve starts it "
                f"(the app found no {ADDRESS_VARIABLE} / {KEY_VARIABLE})"
            )
        return cls.over_socket(address, bytes.fromhex(key), timeout_s)

    async def load(self, model: ModelKey) -> Loaded:
        """Load ``model`` in the batch loop; its answer says whether to send it plain JPEGs
        undecoded, and how many images a run may hold. A model the loop could not load or warm
        up is a :class:`BundleError` with its reason: a server must not start without it."""
        request = Load(model)
        reply = await self._answer(request, self._load_timeout_s)
        if isinstance(reply, Failed):
            raise BundleError(reply.message)
        loaded = self._expected(reply, Loaded, request)
        self._loaded.add(model)
        return loaded

    async def ping(self) -> None:
        """Return once the batch loop has answered (within the deadline)."""
        await self.call(Ping(), Pong, self.timeout_s)

    async def call(self, request: Request, expected: type[ReplyT], timeout_s: float) -> ReplyT:
        """Send ``request`` and await its reply, which must be an ``expected``, for at most
        ``timeout_s``; :class:`Failed` from the batch loop is a 500 naming its reason."""
        reply = await self._answer(request, timeout_s)
        if isinstance(reply, Failed):
            raise ModelFailure(ErrorCode.INTERNAL_ERROR, f"{self.name} failed: {reply.message}")
        return self._expected(reply, expected, request)

    async def _answer(self, request: Request, timeout_s: float | None) -> Reply:
        """``request``'s reply within ``timeout_s`` (``None``: no limit) of the link being ready;
        (re)connecting, with its reloads, has the load deadline of its own."""
        link = await self._connected()
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await link.call(next(self._numbers), request, deadline)
        except TimeoutError:
            self.answering = False
            raise DeadlineExceeded(
                ErrorCode.MODEL_TIMEOUT,
                f"{self.name} did not answer a {type(request).__name__} call by its deadline",
            ) from None

    def _expected(self, reply: Reply, expected: type[ReplyT], request: Request) -> ReplyT:
        """``reply``, if it is what ``request`` calls for; else the connection cannot be trusted."""
        if isinstance(reply, expected):
            return reply
        if self._link is not None:
            self._link.close(self.not_answering(RuntimeError(f"it answered {reply!r:.80} to {request!r:.80}")))
        raise ModelFailure(ErrorCode.INTERNAL_ERROR, f"{self.name} answered {reply!r:.80} to {request!r:.80}")

    async def close(self) -> None:
        """Close the connection; a call still in flight fails with a 503."""
        if self._link is not None:
            await self._link.stop(self.not_answering(RuntimeError("the worker closed its connection")))
            self._link = None

    async def _connected(self) -> _Link:
        """The open link, or a new one with this worker's models loaded again."""
        if self._link is not None and not self._link.closed:
            return self._link
        async with self._connecting:
            if self._link is not None and not self._link.closed:
                return self._link
            try:
                async with asyncio.timeout(self._load_timeout_s):
                    self._link = await self._reconnect()
            except TimeoutError:
                self.answering = False
                raise self.not_answering(TimeoutError("reconnecting took longer than a load may")) from None
            return self._link

    async def _reconnect(self) -> _Link:
        """A new link, with this worker's models loaded again (the batch loop counts its users per
        connection, and may have released them when the old one closed)."""
        try:
            channel = await self._connect()
        except (EOFError, OSError, multiprocessing.AuthenticationError) as error:
            self.answering = False
            raise self.not_answering(error) from None
        link = _Link(channel, self)
        try:
            for model in list(self._loaded):
                if not isinstance(await link.call(next(self._numbers), Load(model), math.inf), Loaded):
                    raise self.not_answering(RuntimeError(f"could not load {model[0]} again after reconnecting"))
        except BaseException as error:
            link.close(error if isinstance(error, NotReady) else self.not_answering(error))
            raise
        return link

    def not_answering(self, error: BaseException) -> NotReady:
        """A 503: the client retries, by which time a restarted service may answer."""
        return NotReady(ErrorCode.NOT_READY, f"{self.name} is not answering ({error!r})")


class _Link:
    """One open connection: the calls owed an answer on it, by number, and the task that reads
    the answers. Once it closes, every call owed fails with the error that closed it."""

    def __init__(self, channel: Channel, client: HostClient):
        self._channel = channel
        self._client = client
        self._owed: dict[int, asyncio.Future[Reply]] = {}
        self._error: NotReady | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="mixoe-batch-loop-answers")

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def call(self, number: int, request: Request, deadline: float) -> Reply:
        if self._error is not None:
            raise self._error
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._owed[number] = answer
        try:
            try:
                await self._channel.send(Call(number, request, deadline))
            except (EOFError, OSError) as error:  # the connection has gone
                failure = self._client.not_answering(error)
                self.close(failure)
                raise failure from None
            return await answer
        finally:
            self._owed.pop(number, None)

    async def _read(self) -> None:
        """Hand each answer (a message holds one, or a batch's for this worker) to the call of
        its number (one that gave up has gone: dropped)."""
        try:
            while True:
                message = await self._channel.receive()
                for answer in message if isinstance(message, list) else [message]:
                    if not isinstance(answer, Answer):
                        raise ChannelClosed(f"not an answer: {answer!r:.80}")
                    self._client.answering = True
                    waiting = self._owed.pop(answer.number, None)
                    if waiting is not None and not waiting.done():
                        waiting.set_result(answer.reply)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # EOF, a reset, a corrupt frame: the connection is unusable
            self.close(self._client.not_answering(error))

    def close(self, error: NotReady) -> None:
        """Close the connection and fail every call owed an answer on it with ``error``."""
        if self._error is None:
            self._error = error
            self._client.answering = False
            self._channel.close()
        owed, self._owed = list(self._owed.values()), {}
        for waiting in owed:
            if not waiting.done():
                waiting.set_exception(error)
        if self._reader is not asyncio.current_task():
            self._reader.cancel()

    async def stop(self, error: NotReady) -> None:
        self.close(error)
        await asyncio.gather(self._reader, return_exceptions=True)


def _open(address: str, key: bytes, timeout_s: float) -> socket.socket:
    """An authenticated socket to the model process (blocking: run in a thread); the kernel
    timeouts bound the connection and the handshake, after which the event loop owns it,
    non-blocking."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.setblocking(True)
        set_timeouts(raw, timeout_s)
        raw.connect(address)
        connection = Connection(raw.detach())
    return authenticated_socket(connection, key, initiator=True)


def set_timeouts(
    raw: socket.socket, timeout_s: float, options: tuple[int, ...] = (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
) -> None:
    """Kernel timeouts on ``raw``'s blocking calls (``0``: none); ``settimeout`` would make the
    socket non-blocking, which :class:`~multiprocessing.connection.Connection` does not expect."""
    seconds = int(timeout_s)
    packed = struct.pack("ll", seconds, int((timeout_s - seconds) * 1_000_000))
    for option in options:
        raw.setsockopt(socket.SOL_SOCKET, option, packed)
