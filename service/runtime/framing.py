"""How a worker and the model process frame their messages on the Unix socket between them.

A frame is an 8-byte big-endian length, then that many bytes of pickle (protocol 5: a request's
crops, one numpy array, travel as one buffer). Both ends own this format, rather than borrowing
:mod:`multiprocessing.connection`'s, so that a worker's event loop reads and writes the socket
itself (:class:`AsyncChannel`, an asyncio protocol: no thread and no system call per message
beyond the loop's own), while the model process reads each worker in a thread of its own and
answers from its batch loop (:class:`BlockingChannel`). Both read in large chunks and cut frames
out of them (:class:`FrameBuffer`), so a burst of small messages costs one read, not two each.
Only the handshake, which authenticates the peer with the shared key, uses
:mod:`multiprocessing.connection` (:func:`authenticated_socket`).

A frame cut short (a peer that died mid-frame, a send past the model process's time limit)
leaves the stream unusable: both channels then close, and every call still owed on it fails
(``service.runtime.model_client``).
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import pickle
import socket
import struct
import threading
from collections import deque
from typing import Any, cast

_LENGTH = struct.Struct("!Q")
MAX_FRAME_BYTES = 1 << 34
"""A length beyond this (16 GiB) is not a message but a corrupt stream."""
_CHUNK_BYTES = 1 << 18


class ChannelClosed(EOFError):
    """The peer closed the connection, or the stream holds no valid frame."""


def encode(message: Any) -> list[bytes]:
    """``message`` as one frame: its length header and its pickle, written together."""
    payload = pickle.dumps(message, protocol=5)
    return [_LENGTH.pack(len(payload)), payload]


class FrameBuffer:
    """Bytes as they arrive in, whole messages out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Add ``data``; the messages it completed, in order (:class:`ChannelClosed` for a corrupt length)."""
        self._buffer += data
        messages = []
        start = 0
        while len(self._buffer) - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, start)
            if length > MAX_FRAME_BYTES:
                raise ChannelClosed(f"a frame of {length} bytes: the stream is corrupt")
            end = start + _LENGTH.size + length
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]
        return messages


class BlockingChannel:
    """The model process's end of one worker's socket: one thread receives, the batch loop sends.

    Sending is bounded by the socket's send timeout (``SO_SNDTIMEO``, set by the caller), so a
    worker that stops reading holds the batch loop no longer; a send that fails closes the
    channel (part of a frame may have been written), which the receiving thread then sees as
    the end."""

    def __init__(self, sock: socket.socket):
        self._socket = sock
        self._closed = threading.Event()
        self._frames = FrameBuffer()
        self._received: deque[Any] = deque()

    def send(self, message: Any) -> None:
        try:
            self._socket.sendall(b"".join(encode(message)))  # answers are small: one system call
        except OSError:
            self.close()
            raise

    def receive(self) -> Any:
        """The next message; :class:`ChannelClosed` (an ``EOFError``) at the end of the stream."""
        while not self._received:
            chunk = self._socket.recv(_CHUNK_BYTES)
            if not chunk:
                raise ChannelClosed("the peer closed the connection")
            self._received.extend(self._frames.feed(chunk))
        return self._received.popleft()

    def close(self) -> None:
        """Close; a thread blocked in :meth:`receive` wakes with the end of the stream."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer reset it already
        self._socket.close()


class AsyncChannel(asyncio.Protocol):
    """A worker's end of its socket, on its event loop: writes are buffered by the transport (so
    concurrent calls never interleave their frames, and a send never waits), messages are cut out
    of what arrives and queued for the one task that reads them (``service.runtime.model_client``).

    Build it with :meth:`over`."""

    def __init__(self) -> None:
        self._frames = FrameBuffer()
        self._received: asyncio.Queue[Any] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._end: BaseException | None = None

    @classmethod
    async def over(cls, sock: socket.socket) -> AsyncChannel:
        """A channel on the connected, authenticated ``sock``."""
        sock.setblocking(False)
        _, channel = await asyncio.get_running_loop().connect_accepted_socket(cls, sock)
        return channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        try:
            for message in self._frames.feed(data):
                self._received.put_nowait(message)
        except Exception as error:  # a corrupt frame: the stream is unusable
            self._finish(error)

    def connection_lost(self, error: Exception | None) -> None:
        self._finish(error or ChannelClosed("the model process closed the connection"))

    async def send(self, message: Any) -> None:
        if self._end is not None or self._transport is None:
            raise ChannelClosed(f"the connection is closed ({self._end!r})")
        self._transport.writelines(encode(message))  # buffered whole: never a half frame, never a wait

    async def receive(self) -> Any:
        message = await self._received.get()
        if isinstance(message, _End):
            raise message.error
        return message

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # unsent frames are dropped: their calls fail as the link closes

    def _finish(self, error: BaseException) -> None:
        if self._end is None:
            self._end = error
            self._received.put_nowait(_End(error if isinstance(error, (EOFError, OSError)) else ChannelClosed(repr(error))))
            self.close()


class _End:
    """Queued after the last message: what ended the stream."""

    def __init__(self, error: BaseException):
        self.error = error


def authenticated_socket(connection: multiprocessing.connection.Connection, key: bytes, initiator: bool) -> socket.socket:
    """Run the shared-key handshake on ``connection`` (both ways: each end proves it holds the
    key), then hand over its socket for framed messages. Blocking; the caller bounds it with the
    socket's timeouts. ``initiator``: the worker, which connected."""
    try:
        if initiator:
            multiprocessing.connection.answer_challenge(connection, key)
            multiprocessing.connection.deliver_challenge(connection, key)
        else:
            multiprocessing.connection.deliver_challenge(connection, key)
            multiprocessing.connection.answer_challenge(connection, key)
        return socket.socket(fileno=os.dup(connection.fileno()))
    finally:
        connection.close()
