"""Batch sizes chosen by measurement: time each batch size at warm-up, cap batches at the best.

Batching pays where the device runs a batch in little more time than one image (a GPU). On a
2-core AMD EPYC, MobileNetV2 ran 44 images/s at batch 1 and 12.7 at batch 32, and the batched
server was slower than one without batching (2026-11-27, ``benchmarks/RESULTS.md``). So at warm-up
(:meth:`service.runtime.batch_loop.inference.ModelRunner.warm_up`) each candidate size, after the
warm-up's own throw-away batch, runs a few more times; the fastest run is its time, and batches
never hold more images than the size with the most images per second. The fastest, not the median:
another process busy beside the warm-up (a server's HTTP workers start while its model process
times) only ever adds time. With the median, start-ups of the same server on a 2-core EPYC chose
batch 2, 4 or 8 (``benchmarks/RESULTS.md``). ``MIXOE_BATCH_SIZE_TUNING=false``
turns this off: batches then hold up to ``MIXOE_MAX_BATCH_SIZE``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

TIMED_RUNS = 3
"""Timed runs per batch size (after the warm-up's throw-away run); the fastest counts."""


class BatchSizeTuning:
    """The warm-up's timings of one model, size by size, and the batch size limit they give.

    ``clock`` (seconds, monotonic) is injectable so that tests give fake timings."""

    def __init__(self, sizes: Sequence[int], clock: Callable[[], float] = time.perf_counter, runs: int = TIMED_RUNS):
        if not sizes or min(sizes) < 1 or runs < 1:
            raise ValueError(f"need batch sizes >= 1 and runs >= 1, got sizes {list(sizes)} and runs {runs}")
        self.sizes = sorted(set(sizes))
        self._clock = clock
        self._runs = runs
        self.seconds: dict[int, float] = {}
        """Seconds per batch (the fastest run), by batch size, of the sizes timed so far."""

    def time(self, rows: int, run_batch: Callable[[], object]) -> None:
        """Time ``run_batch`` (a batch of ``rows`` images, run to completion) ``runs`` times."""
        durations = []
        for _ in range(self._runs):
            started = self._clock()
            run_batch()
            durations.append(self._clock() - started)
        self.seconds[rows] = min(durations)

    @property
    def complete(self) -> bool:
        return set(self.seconds) == set(self.sizes)

    @property
    def images_per_s(self) -> dict[int, float]:
        return {rows: rows / max(seconds, 1e-9) for rows, seconds in self.seconds.items()}  # a clock may not move

    @property
    def best(self) -> int | None:
        """The timed size with the most images per second (a tie goes to the smaller size: as
        fast, and less waiting for a batch to fill); ``None`` before any size was timed."""
        rates = self.images_per_s
        return max(sorted(rates), key=lambda rows: rates[rows]) if rates else None  # max keeps the first of equals

    def limit(self, configured: int) -> int:
        """The most images per batch: ``configured``, or the best timed size if that is smaller."""
        best = self.best
        return configured if best is None else min(configured, best)

    def log(self, logger: logging.Logger, model: str) -> None:
        """One log line (a JSON object, ``service.monitoring.logs``) with the table and the best size."""
        logger.info(
            "batch sizes timed for %s: at most %s images per batch", model, self.best,
            extra={
                "model": model,
                "batch_seconds": {str(rows): round(seconds, 6) for rows, seconds in sorted(self.seconds.items())},
                "images_per_s": {str(rows): round(rate, 2) for rows, rate in sorted(self.images_per_s.items())},
                "batch_size_limit": self.best,
            },
        )
