"""The batch loop of a single server: the model process's :class:`ModelHost`, in a thread of this process.

Without a model process a server still has exactly one batching point, and it is the same code:
a :class:`~service.runtime.batch_loop.model_host.ModelHost` runs in the server's inference thread (which
also warms each model up, so the thread that serves has built its cuDNN plans), and requests
reach it through a :class:`~service.runtime.model_client.HostClient` whose channel is a queue
instead of a socket: a call becomes a task of the loop, an answer comes back through the event
loop. Deadlines, answers routed by call number, the drain at shutdown: all as with a model process.

The loop is given the bundles this process loaded (hash-, signature- and pin-checked) instead of
loading them again from disk. Should its thread end other than by :meth:`LocalHost.stop` (a bug:
each task's own errors are answered), :attr:`LocalHost.failure` says why, every request waiting on
it gets a 503, and readiness and liveness turn false: only a restart mends it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from models.runtime import Bundle
from service.runtime.framing import ChannelClosed
from service.runtime.model_client import Channel, HostClient
from service.runtime.batch_loop.host_tasks import Loader, Release, Task
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.protocol import Answer, Call, ModelKey, model_key

logger = logging.getLogger("mixoe.batch_loop")

_CLOSED = None  # what a mailbox receives once the loop will answer no more


class LocalHost:
    """A :class:`ModelHost` serving ``bundles`` in a thread of its own, until :meth:`stop`."""

    def __init__(self, host_of: Callable[[Loader], ModelHost], bundles: list[Bundle]):
        """``host_of(loader)`` builds the host around the loader that hands it ``bundles``."""
        self._bundles: dict[ModelKey, Bundle] = {model_key(bundle): bundle for bundle in bundles}
        self._host: ModelHost = host_of(self._bundle)
        self._mailboxes: weakref.WeakSet[_Mailbox] = weakref.WeakSet()  # the open channels' (a closed one's goes)
        self._stopping = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._serve, name="mixoe-inference", daemon=True)
        self._thread.start()

    def client(self, timeout_s: float) -> HostClient:
        """A client whose calls, made on the running event loop, become this loop's tasks."""
        return HostClient(self._connect, timeout_s, name="the batch loop", load_timeout_s=None)

    async def stop(self) -> None:
        """Stop the loop once it has run what is queued (every client closed first)."""
        self._stopping = True
        self._host.stop()
        await asyncio.to_thread(self._thread.join)

    def _bundle(self, key: ModelKey, device: torch.device) -> Bundle:
        bundle = self._bundles.get(key)
        if bundle is None:
            raise LookupError(f"{key[0]} is not one of the bundles this server loaded")
        return bundle

    async def _connect(self) -> Channel:
        channel = _LocalChannel(self._host)
        self._mailboxes.add(channel.mailbox)
        if self.failure is not None or not self._thread.is_alive():  # checked after adding: no race with its end
            raise ChannelClosed(self.failure or "the batch loop has stopped")
        return channel

    def _serve(self) -> None:
        try:
            self._host.serve_forever()
        except BaseException as error:
            self.failure = f"the batch loop stopped ({error!r})"
            logger.exception("%s; failing every request waiting for it", self.failure)
        else:
            if not self._stopping:
                self.failure = "the batch loop stopped"
        finally:
            for mailbox in list(self._mailboxes):
                mailbox.close()


class _Mailbox:
    """Where the loop's answers to one client go (:class:`~service.runtime.batch_loop.host_tasks.Replies`):
    onto the client's event loop, which may have closed meanwhile (then, like a socket, it fails)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answers: asyncio.Queue[Answer | list[Answer] | None]):
        self._loop = loop
        self._answers = answers

    def send(self, obj: Any) -> None:
        self._put(obj)

    def close(self) -> None:
        """Tell the client the loop answers no more (nothing to tell once its event loop has closed)."""
        try:
            self._put(_CLOSED)
        except OSError:
            pass

    def _put(self, item: Answer | list[Answer] | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._answers.put_nowait, item)
        except RuntimeError as error:  # the event loop has closed: nobody waits any more
            raise OSError(f"the event loop has gone: {error}") from None


class _LocalChannel:
    """A :class:`~service.runtime.model_client.Channel` to a loop in this process."""

    def __init__(self, host: ModelHost):
        self._host = host
        self._answers: asyncio.Queue[Answer | list[Answer] | None] = asyncio.Queue()
        self.mailbox = _Mailbox(asyncio.get_running_loop(), self._answers)

    async def send(self, message: Any) -> None:
        assert isinstance(message, Call)
        self._host.submit(Task(self.mailbox, message.request, message.number, message.deadline))

    async def receive(self) -> Any:
        answer = await self._answers.get()
        if answer is _CLOSED:
            raise ChannelClosed("the batch loop has stopped")
        return answer

    def close(self) -> None:
        self._host.submit(Task(self.mailbox, Release()))
