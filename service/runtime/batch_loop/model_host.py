"""The one batching point: merge every request's run into batches, answer each.

It runs in the model process for all workers (:mod:`service.runtime.batch_loop.model_process`), or in a thread
of a single server (:mod:`service.runtime.batch_loop.local_host`); either way requests reach it as numbered
calls (:mod:`service.runtime.protocol`) through :class:`~service.runtime.model_client.HostClient`.
Tasks (:mod:`service.runtime.batch_loop.host_tasks`) go through one queue and one thread, so batches run one
at a time. A run takes along the runs queued behind it for the same model, up to the model's
batch limit; when nothing is in flight it waits up to ``max_delay_s`` for more to fill the batch
(a batch in flight is answered first). On a GPU, while runs keep coming, one batch is in flight:
the loop launches batch n+1 before it waits for batch n's logits, so the GPU computes while the
loop decodes and crops. A run whose worker has stopped waiting for it (its call's deadline
passed) is dropped when its turn comes, never computed: work queued for nobody cannot pile up.
A ping goes ahead of every other task: the heartbeat asks whether the loop turns, not how long
its queue is, so it waits for the step in progress (a hung batch is still caught) but never for
the runs queued behind it.
The loop thread alone touches its state and its connections (it also closes them), so no lock is
needed.

Models are loaded, warmed up and released by :class:`~service.runtime.batch_loop.model_loads.ModelLoads`,
whose tasks run in this loop too.

Every run the loop takes is owed an answer until it gets one: whatever fails in a step (a batch's
forward pass, judging it, answering one worker) answers each run still owed, of every worker whose
run was merged into that batch or the one in flight, with the error; none is left waiting.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from models.contract.manifest import OperatingPoint
from models.runtime import PendingLogits
from service.runtime.batch_loop.host_tasks import (
    NOBODY, BatchObserver, Loader, LoadDone, LoadFailed, Release, Replies, Stop, Task, WarmUp, error_reply, error_text,
    load_from_disk, reply, send,
)
from service.runtime.batch_loop.inference import ModelRunner, run_crops, stack_on
from service.runtime.cpu_threads import pin_intra_op_threads, settle_intra_op_threads
from service.runtime.verdicts import ImageVerdict
from service.runtime.batch_loop.model_loads import LoadSettings, ModelLoads
from service.runtime.protocol import Answer, Failed, Judged, Load, ModelKey, Ping, Pong, Reply, Run

logger = logging.getLogger("mixoe.batch_loop")

_EXPIRED = Failed("its deadline passed before it ran; dropped")


class ModelHost:
    """Merges runs into batches of the models it loads on request, answers each worker its share."""

    def __init__(
        self,
        device: torch.device,
        max_batch_size: int,
        observer: BatchObserver | None = None,
        decodes_jpeg: bool = False,
        cuda_graphs: bool = True,
        batch_size_tuning: bool = False,
        max_delay_s: float = 0.0,
        loader: Loader = load_from_disk,
        pipelined: bool | None = None,
        intra_op_threads: int | None = None,
    ):
        """``pipelined``: launch the next batch before answering the one in flight (``None``: on
        CUDA, where the forward pass runs asynchronously; on a CPU it has finished by then).
        ``intra_op_threads``: PyTorch's threads for everything the loop runs, warm-up and timing
        included (``None``: the process's count; :func:`~service.runtime.cpu_threads.batch_loop_threads`)."""
        self._device = device
        self._intra_op_threads = intra_op_threads
        self._observer = observer
        self._max_delay_s = max_delay_s
        self._pipelined = device.type == "cuda" if pipelined is None else pipelined
        self._stopped = False
        self._tasks: queue.PriorityQueue[tuple[int, int, Task]] = queue.PriorityQueue()  # (urgency, order, task)
        self._order = itertools.count()
        self._next: Task | None = None  # taken from the queue, but it did not join the last batch
        self._in_flight: _InFlight | None = None  # launched on the device, not yet answered
        self._owed: dict[int, Task] = {}  # runs taken from the queue and not yet answered, by id
        settings = LoadSettings(
            device=device, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
            batch_size_tuning=batch_size_tuning, decodes_jpeg=decodes_jpeg,
        )
        self._models = ModelLoads(settings, loader, lambda task: self.submit(task))
        self._handlers: dict[type, Callable[[Task], None]] = {
            Run: lambda task: self._run(self._gather(task)),
            Load: self._models.on_load,
            Ping: lambda task: reply(task, Pong()),
            LoadDone: self._models.on_load_done,
            WarmUp: self._models.on_warm_up,
            LoadFailed: self._models.on_load_failed,
            Release: lambda task: self._release(task.origin),
            Stop: self._stop,
        }

    def submit(self, task: Task) -> None:
        """Queue ``task``, behind every task queued before it unless it is a ping (see module docstring)."""
        self._tasks.put((0 if isinstance(task.message, Ping) else 1, next(self._order), task))

    @property
    def loaded(self) -> list[ModelKey]:
        return self._models.keys

    def stop(self) -> None:
        """Have :meth:`serve_forever` return once the tasks queued before this one have run."""
        self.submit(Task(NOBODY, Stop()))

    def serve_forever(self) -> None:
        """Run tasks in this thread until :meth:`stop` (never, in the model process)."""
        if self._intra_op_threads is None:
            settle_intra_op_threads()  # the process's count, before decoding threads ask for theirs
        else:
            pin_intra_op_threads(self._intra_op_threads)
        while not self._stopped:
            self.step()

    def _stop(self, task: Task) -> None:
        self._stopped = True

    def _release(self, origin: Replies) -> None:
        """``origin`` has disconnected (its release comes after all its tasks): close it here, where
        it is written to, and stop counting it as a user of any model."""
        try:
            origin.close()
        except OSError:
            pass  # gone already: what matters is to stop counting it as a user
        self._models.release(origin)

    def step(self) -> None:
        """Take the next task (waiting for one) and carry it out."""
        if self._next is not None:
            task, self._next = self._next, None
        else:
            task = self._tasks.get()[2]
        kind = type(task.message).__name__
        try:
            if not self._dropped(task):
                self._handlers[type(task.message)](task)
        except Exception as error:
            logger.exception("batch loop task %s failed", kind)
            if isinstance(task.message, Run):
                self._in_flight = None
                self._fail_owed(error)
            elif isinstance(task.message, LoadDone | WarmUp) and self._models.is_loading(task.message.model):
                self._models.fail_load(task.message.model, error_text(error))
            elif task.origin is not NOBODY:
                reply(task, error_reply(error))

    def _fail_owed(self, error: Exception) -> None:
        """Answer every run still owed an answer with ``error``: a step failed with them in it."""
        owed, self._owed = list(self._owed.values()), {}
        for task in owed:
            reply(task, error_reply(error))

    def _gather(self, first: Task) -> list[Task]:
        """``first`` and the runs queued behind it for the same model, up to the model's batch
        limit (``max_batch_size``, or less as its warm-up measured). With no batch in flight it
        waits for more until ``max_delay_s`` after ``first`` arrived. It stops at the first task
        that does not join, which goes next: no task overtakes another."""
        batch = [first]
        self._owed[id(first)] = first
        model = _run_of(first).model
        limit = self._models.batch_limit(model)
        images = first.images
        deadline = first.arrived + (self._max_delay_s if self._in_flight is None else 0.0)
        while images < limit:
            task = self._poll(deadline - time.monotonic())
            if task is None:
                break
            if self._dropped(task):
                continue
            if (
                isinstance(task.message, Run)
                and task.message.model == model
                and images + task.images <= limit
            ):
                self._owed[id(task)] = task
                batch.append(task)
                images += task.images
            else:
                self._next = task
                break
        return batch

    @staticmethod
    def _dropped(task: Task) -> bool:
        """Whether ``task`` is a run past its deadline, which is then answered, never computed."""
        if isinstance(task.message, Run) and task.expired:
            reply(task, _EXPIRED)
            return True
        return False

    def _run(self, batch: list[Task]) -> None:
        """Launch ``batch`` on the device, then answer the batch launched before it, if any.

        On a GPU the loop thus prepares batch n+1 (decoding, cropping, stacking) while the GPU
        runs batch n. A batch stays in flight only while another run is next in line, so an idle
        host answers at once. Elsewhere the forward pass has finished when :meth:`_launch`
        returns, so the batch is answered at once: holding it while the next one computes would
        only add that batch's time to its latency."""
        launched = self._launch(batch)
        self._answer_in_flight()
        self._in_flight = launched
        if self._pipelined:
            if self._next is None:
                self._next = self._poll()
            if self._next is not None and isinstance(self._next.message, Run):
                return  # answered after the next batch is launched
        self._answer_in_flight()

    def _poll(self, wait_s: float = 0.0) -> Task | None:
        """The next task queued, waiting at most ``wait_s`` for one."""
        try:
            return (self._tasks.get(timeout=wait_s) if wait_s > 0 else self._tasks.get_nowait())[2]
        except queue.Empty:
            return None

    def _launch(self, batch: list[Task]) -> _InFlight | None:
        """Start ``batch``'s forward pass; ``None`` (each worker told why) if that fails."""
        runs = [_run_of(task) for task in batch]
        try:
            runner = self._models.runner(runs[0].model)
            crops = [crop for run in runs for crop in run_crops(runner.bundle, run, self._device)]
            points = [run.point for run in runs for _ in range(run.images)]
            top_ks = [run.top_k for run in runs for _ in range(run.images)]
            rows = [row for row, crop in enumerate(crops) if crop is not None]
            launched = time.monotonic()
            if rows and self._observer is not None:
                arrivals = [task.arrived for task in batch for _ in range(task.images)]
                self._observer.batch_started([launched - arrivals[row] for row in rows])
            pending = runner.start(stack_on(self._device, [cast(Tensor, crops[row]) for row in rows])) if rows else None
        except Exception as error:
            self._fail_batch(batch, error)
            return None
        return _InFlight(
            batch, runner, pending, rows, [points[row] for row in rows], [top_ks[row] for row in rows], launched
        )

    def _answer_in_flight(self) -> None:
        """Wait for the batch in flight, if any, and answer each of its workers its share."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        verdicts: list[ImageVerdict | None] = [None] * sum(task.images for task in flight.batch)
        if flight.pending is not None:
            try:
                decided = flight.runner.judge(flight.pending, flight.points, flight.top_ks)
            except Exception as error:
                self._fail_batch(flight.batch, error)
                return
            for row, verdict in zip(flight.rows, decided, strict=True):
                verdicts[row] = verdict
            if self._observer is not None:
                self._observer.batch_finished(time.monotonic() - flight.launched)
        replies: list[Reply] = []
        start = 0
        for task in flight.batch:
            replies.append(Judged(verdicts[start : start + task.images]))
            start += task.images
        self._answer(flight.batch, replies)

    def _answer(self, batch: list[Task], replies: list[Reply]) -> None:
        """Answer a batch's runs, each worker's in one message: they are owed nothing more (still
        owed if sending fails other than on a closed connection: the step's failure then answers them)."""
        by_origin: dict[int, list[Task]] = {}
        answers: dict[int, list[Answer]] = {}
        for task, outcome in zip(batch, replies, strict=True):
            by_origin.setdefault(id(task.origin), []).append(task)
            answers.setdefault(id(task.origin), []).append(Answer(task.call, outcome))
        for origin, tasks in by_origin.items():
            send(tasks[0].origin, answers[origin])
            for task in tasks:
                del self._owed[id(task)]

    def _fail_batch(self, batch: list[Task], error: Exception) -> None:
        logger.exception("batch of %d requests failed", len(batch), exc_info=error)
        self._answer(batch, [error_reply(error)] * len(batch))


@dataclass(frozen=True)
class _InFlight:
    """A batch launched on the device: its runs, and what judging it needs. ``rows`` are the
    images the decoder took, with their operating points and top-k sizes; ``pending`` is
    ``None`` when it took none."""

    batch: list[Task]
    runner: ModelRunner
    pending: PendingLogits | None
    rows: list[int]
    points: list[OperatingPoint]
    top_ks: list[int]
    launched: float


def _run_of(task: Task) -> Run:
    assert isinstance(task.message, Run)
    return task.message
