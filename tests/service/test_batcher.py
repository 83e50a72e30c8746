"""The micro-batcher on its own: batching, routing of results, failures, back-pressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.errors import NotReady, Overloaded
from service.app import create_app
from service.runtime.batcher import MicroBatcher
from service.settings import Settings
from tests.service.helpers import Recorder, TinyModel, role_files


class Gate:
    """A batch function that holds the inference thread until :meth:`open` (at most 5 s), then echoes its items."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self._event.wait(5)
        return items

    def open(self) -> None:
        self._event.set()


def make(
    run_batch: Callable[[list[Any]], Sequence[Any]], observer: Recorder, executor: ThreadPoolExecutor, **options: Any
) -> MicroBatcher[Any, Any]:
    defaults = {"max_batch_size": 8, "max_delay_s": 0.02, "queue_size": 64, "retry_after_s": 3}
    return MicroBatcher(run_batch, executor=executor, observer=observer, **(defaults | options))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_concurrent_items_are_batched_and_routed_back(executor: ThreadPoolExecutor) -> None:
    observer = Recorder()
    threads: set[str] = set()

    def double(items: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return [2 * item for item in items]

    async def scenario() -> list[list[int]]:
        batcher = make(double, observer, executor)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([i, 100 + i]) for i in range(12)))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert results == [[2 * i, 2 * (100 + i)] for i in range(12)]
    assert max(observer.batch_sizes) == 8 and sum(observer.batch_sizes) == 24
    assert threads and threading.main_thread().name not in threads  # never on the event loop's thread
    assert observer.depth == 0
    assert observer.finished == len(observer.batch_sizes)  # every batch reported its end


def test_a_lone_item_waits_at_most_the_delay(executor: ThreadPoolExecutor) -> None:
    observer = Recorder()

    async def scenario() -> float:
        batcher = make(lambda items: items, observer, executor, max_delay_s=0.05, max_batch_size=32)
        await batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(["x"])
        elapsed = loop.time() - started
        await batcher.stop()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert 0.04 <= elapsed < 1.0
    assert observer.batch_sizes == [1]


def test_a_failing_batch_fails_every_request_in_it(executor: ThreadPoolExecutor) -> None:
    def explode(items: list[int]) -> list[int]:
        raise ValueError("model crashed")

    async def scenario() -> list[object]:
        batcher = make(explode, Recorder(), executor, max_delay_s=0.05)
        await batcher.start()
        outcomes = await asyncio.gather(batcher.submit([1]), batcher.submit([2, 3]), return_exceptions=True)
        await batcher.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, ValueError) and "model crashed" in str(outcome) for outcome in outcomes)


def test_wrong_number_of_results_is_an_error(executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        batcher = make(lambda items: items[:-1], Recorder(), executor)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
                await batcher.submit([1, 2])
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_full_queue_is_refused_whole_with_retry_after(executor: ThreadPoolExecutor) -> None:
    gate = Gate()

    async def scenario() -> None:
        observer = Recorder()
        batcher = make(gate, observer, executor, max_batch_size=1, queue_size=2, max_delay_s=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([1]))  # taken by the worker, blocks the thread
        while observer.batch_sizes != [1]:
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(batcher.submit([2, 3]))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit([4])
        assert refused.value.retry_after_s == 3
        assert observer.depth == 2  # the refused item was never queued
        gate.open()
        assert await first == [1] and await second == [2, 3]
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_with_drain_finishes_queued_work_then_refuses(executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        batcher = make(lambda items: [item + 1 for item in items], Recorder(), executor, max_delay_s=0.2)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit([i])) for i in range(5)]
        await asyncio.sleep(0)  # let them enqueue
        await batcher.stop(drain=True)
        assert [await task for task in pending] == [[1], [2], [3], [4], [5]]
        with pytest.raises(NotReady):
            await batcher.submit([9])

    asyncio.run(scenario())


def test_stop_without_drain_fails_what_is_pending(executor: ThreadPoolExecutor) -> None:
    gate = Gate()

    async def scenario() -> None:
        observer = Recorder()
        batcher = make(gate, observer, executor, max_batch_size=1, max_delay_s=0)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit([1]))
        queued = asyncio.ensure_future(batcher.submit([2]))
        while observer.batch_sizes != [1]:
            await asyncio.sleep(0.001)
        await batcher.stop(drain=False)
        gate.open()
        for task in (running, queued):
            with pytest.raises(NotReady):
                await task
        assert observer.depth == 0

    asyncio.run(scenario())


def test_stop_is_not_lost_when_an_item_arrives_in_the_same_turn(executor: ThreadPoolExecutor) -> None:
    """The worker waits (up to ``max_delay_s``) for more items; an item and ``stop`` arriving together must
    still stop it. With ``asyncio.wait_for`` on Python 3.11 the cancellation was swallowed and stop hung."""

    async def scenario() -> None:
        batcher = make(lambda items: items, Recorder(), executor, max_delay_s=5)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)  # the worker holds item 1 and waits for the batch to fill
        second = asyncio.ensure_future(batcher.submit([2]))
        await asyncio.sleep(0)  # `second` queues its item and wakes the worker; stop() lands in the same turn
        async with asyncio.timeout(2):
            await batcher.stop(drain=False)
        for task in (first, second):
            with pytest.raises(NotReady):
                await task

    asyncio.run(scenario())


class FailingObserver(Recorder):
    """A Recorder whose ``batch_started`` or ``queue_changed`` (as the worker calls it) raises."""

    def __init__(self, fail_in: str) -> None:
        super().__init__()
        self._fail_in = fail_in

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        if self._fail_in == "batch_started":
            raise RuntimeError("observer broke")
        super().batch_started(queue_waits)

    def queue_changed(self, delta: int) -> None:
        if self._fail_in == "collect" and delta < 0:  # the worker taking an item
            raise RuntimeError("observer broke")
        super().queue_changed(delta)


def test_an_observer_failing_at_batch_start_fails_that_batch_and_the_batcher_serves_on(
    executor: ThreadPoolExecutor,
) -> None:
    """``batch_started`` once ran outside the batch's ``try``: its error killed the worker task and
    left every request waiting forever."""
    observer = FailingObserver("batch_started")

    async def scenario() -> None:
        batcher = make(lambda items: items, observer, executor, max_delay_s=0)
        await batcher.start()
        async with asyncio.timeout(10):
            with pytest.raises(RuntimeError, match="observer broke"):
                await batcher.submit([1])
            assert batcher.running and batcher.failure is None
            observer._fail_in = "nowhere"
            assert await batcher.submit([2]) == [2]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_worker_task_that_dies_fails_every_waiting_request_and_refuses_new_ones(executor: ThreadPoolExecutor) -> None:
    async def scenario() -> None:
        batcher = make(lambda items: items, FailingObserver("collect"), executor, max_delay_s=0)
        await batcher.start()
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(batcher.submit([1]), batcher.submit([2, 3]), return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, NotReady) and "observer broke" in outcome.message, outcome
        assert not batcher.running and batcher.failure is not None and "observer broke" in batcher.failure
        with pytest.raises(NotReady, match="the batcher of model model stopped"):
            await batcher.submit([4])
        await batcher.stop()

    asyncio.run(scenario())


def test_a_dead_batcher_is_a_503_and_turns_readiness_and_liveness_false(
    tiny: TinyModel, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(make_settings())) as client:
        metrics = client.app.state.context.metrics  # type: ignore[attr-defined]
        real = metrics.queue_changed

        def queue_changed(delta: int) -> None:
            if delta < 0:
                raise RuntimeError("observer broke")
            real(delta)

        monkeypatch.setattr(metrics, "queue_changed", queue_changed)
        response = client.post("/predict", files=role_files(tiny, "accepted"))
        assert response.status_code == 503
        assert response.json()["code"] == "not_ready" and "observer broke" in response.json()["error"]
        for probe in ("/v2/health/ready", "/v2/health/live"):
            answer = client.get(probe)
            assert answer.status_code == 503 and "batcher" in answer.json()["error"], probe
