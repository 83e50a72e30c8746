"""Asyncio micro-batcher: coalesce concurrent requests into model batches (after Ray Serve's batching).

A GPU (or a CPU with MKL-DNN) classifies 32 images in little more time than one, so throughput
under concurrency comes from batching, not from more threads. Requests put ``(item, future)``
pairs on a bounded queue; one worker task takes up to ``max_batch_size`` items, waiting at most
``max_delay_s`` after the first for more, runs the batch function in the dedicated inference
thread (never on the event loop), checks that it returned one result per item, and resolves each
future. A failed batch fails every request in it with the same error.

Back-pressure: the queue is bounded; a request that does not fit is refused at once with
:class:`~service.api.errors.Overloaded` (HTTP 503 + Retry-After) rather than left to time out.
Shutdown: :meth:`MicroBatcher.stop` with ``drain=True`` refuses new work and finishes what is
queued, which is what SIGTERM needs.

Failure: should the worker task itself end with an error (a bug in the batcher or an observer;
a failing batch function only fails its batch), every request waiting fails with
:class:`~service.api.errors.NotReady` naming the error, the batcher refuses new ones, and
:attr:`MicroBatcher.failure` says why, for readiness and liveness to report it: nothing waits on a
future that nobody will resolve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.api.errors import ErrorCode, NotReady, Overloaded

logger = logging.getLogger("mixoe.batcher")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatchObserver(Protocol):
    """Receives the batcher's measurements (implemented by :class:`service.monitoring.metrics.ServiceMetrics`)."""

    def queue_changed(self, delta: int) -> None: ...

    def batch_started(self, queue_waits: Sequence[float]) -> None: ...

    def batch_finished(self, seconds: float) -> None: ...


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]
    enqueued_at: float


class MicroBatcher(Generic[ItemT, ResultT]):
    """Batches items for ``run_batch`` (called in ``executor``), one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        executor: Executor,
        observer: BatchObserver,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        retry_after_s: int,
        name: str = "model",
    ):
        if max_batch_size < 1 or queue_size < 1 or max_delay_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, queue_size >= 1, max_delay_s >= 0; got "
                f"{max_batch_size}, {queue_size}, {max_delay_s}"
            )
        self._run_batch = run_batch
        self._executor = executor
        self._observer = observer
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._retry_after_s = retry_after_s
        self._name = name
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] = asyncio.Queue(maxsize=queue_size)
        self._current: list[_Pending[ItemT, ResultT]] = []
        self._worker: asyncio.Task[None] | None = None
        self._accepting = False
        self.failure: str | None = None
        """Why the worker task ended on its own (it never does but by a bug), else ``None``."""

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task on the running loop."""
        if self.running:
            raise RuntimeError(f"batcher {self._name} is already running")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self._name}")
        self._worker.add_done_callback(self._worker_ended)
        self._accepting = True
        self.failure = None

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new items; with ``drain``, first finish everything queued (at most ``timeout`` s).

        Whatever is still pending afterwards (``drain=False``, or the timeout ran out) fails with
        :class:`NotReady`, so no request waits forever on a future nobody will resolve.
        """
        self._accepting = False
        if drain and self.running:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except TimeoutError:
                logger.warning("batcher %s: %d images still queued after %ss", self._name, self._queue.qsize(), timeout)
        if self._worker is not None:
            self._worker.remove_done_callback(self._worker_ended)
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._fail_pending(NotReady(ErrorCode.NOT_READY, "the server is shutting down"))

    def _fail_pending(self, error: Exception) -> None:
        """Fail the current batch and everything queued with ``error`` (then tell the observer,
        which may be what failed)."""
        abandoned = self._current
        self._current = []
        queued = 0
        while not self._queue.empty():
            abandoned.append(self._queue.get_nowait())
            self._queue.task_done()
            queued += 1
        for pending in abandoned:
            if not pending.future.done():
                pending.future.set_exception(error)
        if queued:
            self._observer.queue_changed(-queued)

    def _worker_ended(self, worker: asyncio.Task[None]) -> None:
        """The worker task ended without :meth:`stop`: refuse new work and fail what is waiting."""
        error = None if worker.cancelled() else worker.exception()
        self.failure = f"the batcher of model {self._name} stopped ({'cancelled' if error is None else repr(error)})"
        self._accepting = False
        logger.error("%s; failing every request waiting for it", self.failure, exc_info=error)
        try:
            self._fail_pending(NotReady(ErrorCode.NOT_READY, f"{self.failure}; retry on another replica"))
        except Exception:  # the observer again, say: the requests have their answers already
            logger.exception("batcher %s: reporting the failed requests failed too", self._name)

    async def submit(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Queue all ``items`` (or none: a request is never half-accepted) and await their results."""
        if self.failure is not None:
            raise NotReady(ErrorCode.NOT_READY, f"{self.failure}; retry on another replica")
        if not self._accepting:
            raise NotReady(ErrorCode.NOT_READY, f"model {self._name} is not accepting requests (starting or stopping)")
        free = self._queue.maxsize - self._queue.qsize()
        if len(items) > free:
            raise Overloaded(
                f"model {self._name} is overloaded: {len(items)} images do not fit in the queue "
                f"({free} of {self._queue.maxsize} places free); retry in {self._retry_after_s}s",
                retry_after_s=self._retry_after_s,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures: list[asyncio.Future[ResultT]] = []
        for item in items:
            future: asyncio.Future[ResultT] = loop.create_future()
            self._queue.put_nowait(_Pending(item, future, now))
            futures.append(future)
        self._observer.queue_changed(len(items))
        return list(await asyncio.gather(*futures))

    async def _work(self) -> None:
        while True:
            self._current = []
            await self._collect(self._current)
            try:
                live = [pending for pending in self._current if not pending.future.done()]  # skip abandoned requests
                if live:
                    await self._run(live)
            finally:
                for _ in self._current:
                    self._queue.task_done()

    async def _collect(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        """Wait for one item, then take more until the batch is full or ``max_delay_s`` has passed.

        Items go straight into ``batch`` (the batcher's current batch), so that :meth:`stop` can
        fail them even if it interrupts the collection.
        """
        loop = asyncio.get_running_loop()
        batch.append(await self._queue.get())
        self._observer.queue_changed(-1)
        deadline = loop.time() + self._max_delay_s
        while len(batch) < self._max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
                # (stop) that arrives just as the item does, and the worker would never exit.
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    return
            else:
                batch.append(self._queue.get_nowait())
            self._observer.queue_changed(-1)

    async def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            self._observer.batch_started([started - pending.enqueued_at for pending in batch])
            results = await loop.run_in_executor(self._executor, self._run_batch, [pending.item for pending in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function of {self._name} returned {len(results)} results for {len(batch)} items"
                )
        except Exception as error:
            logger.exception("batch of %d failed on model %s", len(batch), self._name)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self._observer.batch_finished(loop.time() - started)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
