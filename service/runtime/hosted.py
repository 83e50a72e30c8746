"""Where a request's images go: to the batch loop that holds the model, at once.

A worker forms no batches: each request's images, once checked and decoded, go to the batch loop
(:class:`~service.runtime.batch_loop.model_host.ModelHost`) as one :class:`~service.runtime.protocol.Run`
(or a few, when they exceed the model's batch limit), sent from the event loop at once, however
many other requests are in flight. The batch loop is the one batching point: in a thread of a
single server (``service.runtime.batch_loop.local_host``), or in the model process for every worker
(``MIXOE_MODEL_PROCESS``), where it merges the runs of all of them, so a worker never waits for
its previous batch before the next can form.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Protocol, cast

import numpy as np
import torch
from torch import Tensor

from models.runtime import Bundle
from service.api.errors import ErrorCode, ModelFailure, NotReady
from service.runtime.verdicts import ImageJob, ImageVerdict
from service.runtime.model_client import HostClient
from service.runtime.protocol import Judged, Loaded, Run, model_key


class QueueObserver(Protocol):
    """Counts the images handed to the batch loop and not yet answered
    (:class:`service.monitoring.metrics.ServiceMetrics`: ``mixoe_queue_depth``)."""

    def queue_changed(self, delta: int) -> None: ...


class HostedModel:
    """One model as a worker sees it: held by a batch loop, reached through ``client``.

    A verdict is ``None`` for a plain JPEG the model process's decoder refused (the predictor
    then lets PIL decide). ``observer`` sees the images handed to the batch loop and not yet
    answered (``queue_changed``); the batches are the loop's to count."""

    def __init__(self, client: HostClient, bundle: Bundle, observer: QueueObserver):
        self._client = client
        self._key = model_key(bundle)
        self._name = f"{bundle.name}:{bundle.version}"
        self._input_size = bundle.manifest.preprocessing.input_size
        self._observer = observer
        self._loaded: Loaded | None = None
        self._accepting = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def warm_up(self) -> None:
        """Have the batch loop load (and warm up) this model, unless another worker did."""
        self._loaded = await self._client.load(self._key)

    @property
    def decodes_jpeg(self) -> bool:
        """Whether to send plain JPEGs undecoded (false until :meth:`warm_up`)."""
        return self._loaded is not None and self._loaded.decodes_jpeg

    @property
    def batch_limit(self) -> int:
        """The most images one run holds: the batch loop's limit for this model."""
        if self._loaded is None:
            raise RuntimeError(f"model {self._name} is not loaded in the batch loop yet (warm_up)")
        return self._loaded.batch_limit

    @property
    def running(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        self._accepting = True

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain``, wait (at most ``timeout`` s) for those in flight.
        Whatever is still in flight afterwards fails when the worker closes its connection."""
        self._accepting = False
        if drain:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass

    async def submit(self, jobs: Sequence[ImageJob]) -> list[ImageVerdict | None]:
        """The verdicts of ``jobs``, in order: one run per stretch of jobs that share an operating
        point and top-k (a request's do), cut at the batch limit, all in flight at once."""
        if not self._accepting:
            raise NotReady(ErrorCode.NOT_READY, f"model {self._name} is not accepting requests (starting or stopping)")
        limit = self.batch_limit
        stretches = [
            list(stretch)
            for _, stretch in itertools.groupby(range(len(jobs)), key=lambda row: (jobs[row].operating_point, jobs[row].top_k))
        ]
        chunks = [stretch[start : start + limit] for stretch in stretches for start in range(0, len(stretch), limit)]
        self._in_flight += 1
        self._idle.clear()
        self._observer.queue_changed(len(jobs))
        try:
            runs = [self._run([jobs[row] for row in chunk]) for chunk in chunks]
            answers = [await runs[0]] if len(runs) == 1 else await asyncio.gather(*runs)
        finally:
            self._observer.queue_changed(-len(jobs))
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        return _in_order(
            len(jobs), [row for chunk in chunks for row in chunk], [verdict for answer in answers for verdict in answer]
        )

    async def _run(self, jobs: list[ImageJob]) -> list[ImageVerdict | None]:
        """One run for ``jobs`` (same operating point and top-k): crops stacked into one array,
        JPEGs as bytes; its verdicts put back in the jobs' order."""
        crop_rows = [row for row, job in enumerate(jobs) if isinstance(job.pixels, Tensor)]
        jpeg_rows = [row for row, job in enumerate(jobs) if isinstance(job.pixels, bytes)]
        size = self._input_size
        # A crop may be on the GPU (a single server decoding JPEGs there): the run's array is in CPU memory.
        crops = (
            torch.stack([cast(Tensor, jobs[row].pixels).cpu() for row in crop_rows]).numpy()
            if crop_rows
            else np.empty((0, 3, size, size), dtype=np.uint8)
        )
        run = Run(self._key, crops, [cast(bytes, jobs[row].pixels) for row in jpeg_rows], jobs[0].operating_point, jobs[0].top_k)
        judged = await self._client.call(run, Judged, self._client.timeout_s)
        if len(judged.verdicts) != len(jobs):
            raise ModelFailure(
                ErrorCode.INTERNAL_ERROR,
                f"{self._client.name} answered {len(judged.verdicts)} verdicts for {len(jobs)} images of {self._name}",
            )
        return _in_order(len(jobs), crop_rows + jpeg_rows, judged.verdicts)


def _in_order(count: int, rows: list[int], verdicts: Sequence[ImageVerdict | None]) -> list[ImageVerdict | None]:
    """``verdicts[i]`` put at ``rows[i]``: back in the jobs' order, whatever order they ran in."""
    ordered: list[ImageVerdict | None] = [None] * count
    for row, verdict in zip(rows, verdicts, strict=True):
        ordered[row] = verdict
    return ordered
