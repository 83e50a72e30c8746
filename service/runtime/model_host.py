"""The one batching point: load bundles, merge every request's run into batches, answer each.

It runs in the model process for all workers (:mod:`service.runtime.model_process`), or in a thread
of a single server (:mod:`service.runtime.local_host`); either way requests reach it as numbered
calls (:mod:`service.runtime.protocol`) through :class:`~service.runtime.model_client.HostClient`.
Tasks (:mod:`service.runtime.host_tasks`) go through one queue and one thread, so batches run one
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

Loading a bundle (hash check, weights) happens in a thread of its own, so that a SIGHUP
roll-over's new workers asking for a new version do not stall the batches of the workers still
serving the old one. Its warm-up (one throw-away batch per padded batch size, about 2 s each on a
GPU) must run in this loop's thread, which serves it: PyTorch caches cuDNN's plans per thread, and
an H200 run with the warm-up in the loading thread stalled serving for 2 to 3 s at each batch
size's first use. So each warm-up batch is a task of its own, queued behind the runs already
waiting: another model's runs wait for one warm-up batch at most, not for all of them.

A model is keyed by its bundle's path *and* a digest of its manifest: a version republished in
place under the same path is another model, never the old one in the new one's name.

Every run the loop takes is owed an answer until it gets one: whatever fails in a step (a batch's
forward pass, judging it, answering one worker) answers each run still owed, of every worker whose
run was merged into that batch or the one in flight, with the error; none is left waiting.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from models.contract.manifest import OperatingPoint
from models.runtime import Bundle, PendingLogits
from service.monitoring.logs import log_failure
from service.runtime.inference import ImageVerdict, ModelRunner, graphs_note, stack_on
from service.runtime.host_tasks import (
    NOBODY, BatchObserver, Loader, LoadDone, LoadFailed, Release, Replies, Stop, Task, WarmUp, error_reply, error_text,
    load_from_disk,
)
from service.runtime.jpeg import decode_plain_jpegs
from service.runtime.protocol import Answer, Failed, Judged, Load, Loaded, ModelKey, Ping, Pong, Reply, Run

logger = logging.getLogger("mixoe.batch_loop")

_EXPIRED = Failed("its deadline passed before it ran; dropped")


class ModelHost:
    """Loads bundles on request, merges runs into batches, answers each worker its share."""

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
    ):
        """``pipelined``: launch the next batch before answering the one in flight (``None``: on
        CUDA, where the forward pass runs asynchronously; on a CPU it has finished by then)."""
        self._device = device
        self._cuda_graphs = cuda_graphs
        self._batch_size_tuning = batch_size_tuning
        self._max_batch_size = max_batch_size
        self._observer = observer
        self._max_delay_s = max_delay_s
        self._pipelined = device.type == "cuda" if pipelined is None else pipelined
        self._loader = loader
        self._stopped = False
        self._decodes_jpeg = decodes_jpeg
        self._tasks: queue.PriorityQueue[tuple[int, int, Task]] = queue.PriorityQueue()  # (urgency, order, task)
        self._order = itertools.count()
        self._next: Task | None = None  # taken from the queue, but it did not join the last batch
        self._in_flight: _InFlight | None = None  # launched on the device, not yet answered
        self._runners: dict[ModelKey, ModelRunner] = {}
        self._users: dict[ModelKey, set[Replies]] = {}
        self._loading: dict[ModelKey, list[Task]] = {}  # workers' loads waiting for a load in progress
        self._warming: dict[ModelKey, _WarmingUp] = {}  # loaded, not yet warm: still in _loading
        self._owed: dict[int, Task] = {}  # runs taken from the queue and not yet answered, by id
        self._handlers: dict[type, Callable[[Task], None]] = {
            Run: lambda task: self._run(self._gather(task)),
            Load: self._load,
            Ping: lambda task: _reply(task, Pong()),
            LoadDone: self._loaded,
            WarmUp: self._warm,
            LoadFailed: self._load_failed,
            Release: lambda task: self._release(task.origin),
            Stop: self._stop,
        }

    def submit(self, task: Task) -> None:
        """Queue ``task``, behind every task queued before it unless it is a ping (see module docstring)."""
        self._tasks.put((0 if isinstance(task.message, Ping) else 1, next(self._order), task))

    @property
    def loaded(self) -> list[ModelKey]:
        return list(self._runners)

    def stop(self) -> None:
        """Have :meth:`serve_forever` return once the tasks queued before this one have run."""
        self.submit(Task(NOBODY, Stop()))

    def serve_forever(self) -> None:
        """Run tasks until :meth:`stop` (never, in the model process)."""
        while not self._stopped:
            self.step()

    def _stop(self, task: Task) -> None:
        self._stopped = True

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
            elif isinstance(task.message, LoadDone | WarmUp) and task.message.model in self._loading:
                self._fail_load(task.message.model, error_text(error))
            elif task.origin is not NOBODY:
                _reply(task, error_reply(error))

    def _fail_owed(self, error: Exception) -> None:
        """Answer every run still owed an answer with ``error``: a step failed with them in it."""
        owed, self._owed = list(self._owed.values()), {}
        for task in owed:
            _reply(task, error_reply(error))

    def _gather(self, first: Task) -> list[Task]:
        """``first`` and the runs queued behind it for the same model, up to the model's batch
        limit (``max_batch_size``, or less as its warm-up measured). With no batch in flight it
        waits for more until ``max_delay_s`` after ``first`` arrived. It stops at the first task
        that does not join, which goes next: no task overtakes another."""
        batch = [first]
        self._owed[id(first)] = first
        model = _run_of(first).model
        limit = self._batch_limit(model)
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
            _reply(task, _EXPIRED)
            return True
        return False

    def _batch_limit(self, model: ModelKey) -> int:
        runner = self._runners.get(model)
        return self._max_batch_size if runner is None else runner.batch_limit(self._max_batch_size)

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
            runner = self._runners.get(runs[0].model)
            if runner is None:
                raise RuntimeError(f"model {runs[0].model[0]} is not loaded (send a load request first)")
            crops = [crop for run in runs for crop in self._crops(runner.bundle, run)]
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
        for task, reply in zip(batch, replies, strict=True):
            by_origin.setdefault(id(task.origin), []).append(task)
            answers.setdefault(id(task.origin), []).append(Answer(task.call, reply))
        for origin, tasks in by_origin.items():
            _send(tasks[0].origin, answers[origin])
            for task in tasks:
                del self._owed[id(task)]

    def _fail_batch(self, batch: list[Task], error: Exception) -> None:
        logger.exception("batch of %d requests failed", len(batch), exc_info=error)
        self._answer(batch, [error_reply(error)] * len(batch))

    def _crops(self, bundle: Bundle, run: Run) -> list[Tensor | None]:
        """A run's images as the model's uint8 crops, in its verdicts' order: the worker's crops
        as they came (views of its one array), then its JPEGs, decoded here in one call and
        resized on the device; ``None`` for a JPEG the decoder refused."""
        decoded = decode_plain_jpegs(run.jpegs, self._device) if run.jpegs else []
        jpegs = [None if pixels is None else _crop(bundle, pixels) for pixels in decoded]
        return [*torch.from_numpy(run.crops).unbind(0), *jpegs]

    def _load(self, task: Task) -> None:
        assert isinstance(task.message, Load)
        key = task.message.model
        if key in self._runners:
            self._users[key].add(task.origin)
            _reply(task, self._loaded_reply(key))
        elif key in self._loading:
            self._loading[key].append(task)
        else:
            loader = threading.Thread(target=self._load_in_background, args=(key,), name="mixoe-load", daemon=True)
            loader.start()
            self._loading[key] = [task]  # the loader's answer is a task: this loop runs it later

    def _load_in_background(self, key: ModelKey) -> None:
        path, _ = key
        try:
            bundle = self._loader(key, self._device)
            runner = ModelRunner.for_device(bundle, self._max_batch_size, self._cuda_graphs, self._batch_size_tuning)
        except Exception as error:
            log_failure(logger, f"batch loop could not load {path}", error)
            self.submit(Task(NOBODY, LoadFailed(key, error_text(error))))
            return
        self.submit(Task(NOBODY, LoadDone(key, runner)))

    def _loaded(self, task: Task) -> None:
        assert isinstance(task.message, LoadDone)
        runner = task.message.runner
        self._warming[task.message.model] = _WarmingUp(runner, list(runner.warm_up_sizes))
        self.submit(Task(NOBODY, WarmUp(task.message.model)))

    def _warm(self, task: Task) -> None:
        """One warm-up batch of a model just loaded; the next is queued behind the runs waiting."""
        assert isinstance(task.message, WarmUp)
        key = task.message.model
        warming = self._warming[key]
        if not self._loading[key]:  # every worker that asked has gone meanwhile
            self._discard_load(key)
            return
        try:
            warming.runner.warm_up(warming.sizes[:1])
        except Exception as error:
            log_failure(logger, f"batch loop could not warm up {key[0]}", error)
            self._fail_load(key, error_text(error))
            return
        del warming.sizes[0]
        if warming.sizes:
            self.submit(task)
            return
        bundle = warming.runner.bundle
        logger.info(
            "batch loop loaded %s:%s from %s on %s (warm-up %.1f s%s)",
            bundle.name, bundle.version, key[0], self._device, time.perf_counter() - warming.started,
            graphs_note(bundle),
        )
        del self._warming[key]
        waiting = self._loading.pop(key)
        self._runners[key] = warming.runner
        self._users[key] = {load.origin for load in waiting}
        for load in waiting:
            _reply(load, self._loaded_reply(key))

    def _loaded_reply(self, key: ModelKey) -> Loaded:
        return Loaded(self._decodes_jpeg, self._batch_limit(key))

    def _load_failed(self, task: Task) -> None:
        assert isinstance(task.message, LoadFailed)
        self._fail_load(task.message.model, task.message.message)

    def _fail_load(self, key: ModelKey, message: str) -> None:
        for load in self._discard_load(key):
            _reply(load, Failed(message))

    def _discard_load(self, key: ModelKey) -> list[Task]:
        """Give up ``key``'s load, freeing what it holds: the workers that were waiting for it."""
        if self._warming.pop(key, None) is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()
        return self._loading.pop(key)

    def _release(self, origin: Replies) -> None:
        """``origin`` has disconnected (its release comes after all its tasks): close it here, where
        it is written to, and drop it as a user."""
        try:
            origin.close()
        except OSError:
            pass  # gone already: what matters is to stop counting it as a user
        for waiting in self._loading.values():
            waiting[:] = [load for load in waiting if load.origin is not origin]
        for key in [key for key, users in self._users.items() if origin in users]:
            self._users[key].discard(origin)
            if not self._users[key]:
                self._forget(key)

    def _forget(self, key: ModelKey) -> None:
        del self._users[key], self._runners[key]
        logger.info("batch loop released %s: no worker uses it any more", key[0])
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


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


@dataclass
class _WarmingUp:
    """A model loaded but not yet warm: its runner and the batch sizes still to run."""

    runner: ModelRunner
    sizes: list[int]
    started: float = field(default_factory=time.perf_counter)


def _run_of(task: Task) -> Run:
    assert isinstance(task.message, Run)
    return task.message


def _reply(task: Task, reply: Reply) -> None:
    """Answer a worker's call."""
    _send(task.origin, [Answer(task.call, reply)])


def _send(origin: Replies, answers: list[Answer]) -> None:
    """Send ``answers`` to one worker, as one message (an :class:`Answer`, or a list of them); one
    that has gone away meanwhile is released when its reader sees it."""
    try:
        origin.send(answers[0] if len(answers) == 1 else answers)
    except OSError:
        pass


def _crop(bundle: Bundle, pixels: Tensor) -> Tensor | None:
    """A decoded JPEG as the model's crop; ``None`` if that fails, so that one odd file fails its
    own request (the worker retries it on the CPU) and not a batch of every worker's."""
    try:
        return bundle.pixels(pixels)
    except Exception:
        logger.exception("batch loop could not crop a decoded JPEG of shape %s", tuple(pixels.shape))
        return None
