"""How a worker and the model process frame their messages on the Unix socket between them.

A frame is an 8-byte big-endian length, then that many bytes of pickle (protocol 5: a request's
crops, one numpy array, travel as one buffer). Both ends own this format, rather than borrowing
:mod:`multiprocessing.connection`'s, so that a worker's event loop reads and writes the socket
itself (:class:`AsyncChannel`: no thread per call), while the model process reads each worker in
a thread of its own and answers from its batch loop (:class:`BlockingChannel`). Only the
handshake, which authenticates the peer with the shared key, uses
:mod:`multiprocessing.connection` (:func:`authenticated_socket`).

A frame cut short (a send interrupted by a deadline, a peer that died) leaves the stream unusable:
both channels then close, and every call still owed on it fails (``service.runtime.model_client``).
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import pickle
import socket
import struct
import threading
from typing import Any

_LENGTH = struct.Struct("!Q")
MAX_FRAME_BYTES = 1 << 34
"""A length beyond this (16 GiB) is not a message but a corrupt stream."""


class ChannelClosed(EOFError):
    """The peer closed the connection, or the stream holds no valid frame."""


def encode(message: Any) -> tuple[bytes, bytes]:
    """``message`` as a frame: its length header and its pickle, sent one after the other."""
    payload = pickle.dumps(message, protocol=5)
    return _LENGTH.pack(len(payload)), payload


def _length(header: bytes) -> int:
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ChannelClosed(f"a frame of {length} bytes: the stream is corrupt")
    return length


class BlockingChannel:
    """The model process's end of one worker's socket: one thread receives, the batch loop sends.

    Sending is bounded by the socket's send timeout (``SO_SNDTIMEO``, set by the caller), so a
    worker that stops reading holds the batch loop no longer; a send that fails closes the
    channel (half a frame was written), which the receiving thread then sees as the end."""

    def __init__(self, sock: socket.socket):
        self._socket = sock
        self._closed = threading.Event()

    def send(self, message: Any) -> None:
        header, payload = encode(message)
        try:
            self._socket.sendall(header)
            self._socket.sendall(payload)
        except OSError:
            self.close()
            raise

    def receive(self) -> Any:
        """The next message; :class:`ChannelClosed` (an ``EOFError``) at the end of the stream."""
        length = _length(self._receive_exactly(_LENGTH.size))
        return pickle.loads(self._receive_exactly(length))

    def _receive_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        while view:
            received = self._socket.recv_into(view)
            if received == 0:
                raise ChannelClosed("the peer closed the connection")
            view = view[received:]
        return buffer

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


class AsyncChannel:
    """A worker's end of its socket, read and written by its event loop (non-blocking).

    Sends are serialised by a lock, so concurrent calls never interleave their frames; one task
    receives (``service.runtime.model_client``)."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self._socket = sock
        self._loop = asyncio.get_running_loop()
        self._sending = asyncio.Lock()

    async def send(self, message: Any) -> None:
        """Send one frame. Interrupted halfway (a deadline), the stream is unusable: the channel
        closes, so that the receiving task ends and every call waiting on it fails."""
        header, payload = encode(message)
        async with self._sending:
            try:
                await self._loop.sock_sendall(self._socket, header)
                await self._loop.sock_sendall(self._socket, payload)
            except BaseException:
                self.close()
                raise

    async def receive(self) -> Any:
        length = _length(await self._receive_exactly(_LENGTH.size))
        return pickle.loads(await self._receive_exactly(length))

    async def _receive_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        while view:
            received = await self._loop.sock_recv_into(self._socket, view)
            if received == 0:
                raise ChannelClosed("the model process closed the connection")
            view = view[received:]
        return buffer

    def close(self) -> None:
        self._socket.close()


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
