"""Drift alarms of the served models: one conformal test martingale per model version, in this process.

Every classified image's OOD score becomes a smoothed online conformal p-value
(:class:`models.calibration.online_conformal.OnlineConformal`: ranked against the bundle's calibration scores
and every image this process classified before it since the last reset; the uniform draws from a
generator seeded by the model's name and version), and the model version's
:class:`models.calibration.drift.PowerJumper` bets on it. The served p-values, against the calibration scores
alone, are dependent through that one set, which a long stream exposes as false alarms. The alarm is raised once the
martingale reaches the alarm level and stays raised until reset; the statistics and what they
promise are in ``docs/drift.md``.

With several worker processes each worker watches its own share of the traffic with its own
martingale; each alarms at ``workers / delta``, so the chance that any of them raises a false alarm
stays at most ``delta`` (union bound). ``mixoe_drift_alarm`` is then 1 when any live worker's alarm
is raised, ``mixoe_drift_log10_martingale`` the largest of them (``livemax``: a dead worker's state
is gone with it). A reset (:meth:`DriftAlarms.reset`, the admin route) resets this process at once
and, through a marker file in the shared metrics directory, every other worker before it next
counts an image or answers for its state. Nothing is kept across restarts: a restarted service, or
a newly loaded version, starts from capital 1.

On the event loop the scores of every request answered in one turn of the loop are counted
together, in the order they were answered, once that turn ends: one batch's answers then cost one
ranking and one martingale update, not one per request (on a 2-core CPU, drift work had been a
seventh of the event loop's time at one image per request). The martingale is the same as if each
request had been counted at once (the p-values are computed in order and the uniform draws come
from one stream), and a status or reset counts what is pending first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.calibration.drift import PowerJumper, alarm_log10_level
from models.calibration.online_conformal import OnlineConformal
from models.contract.manifest import Manifest
from service.api.errors import ErrorCode, InvalidParameter
from service.api.schemas import DriftStatus
from service.monitoring.metrics import ServiceMetrics

logger = logging.getLogger("mixoe.drift")


class _Marker(NamedTuple):
    """Which reset marker file is in place: each reset writes a new file (a new inode, while the old
    one is still in place) stamped with the time to the nanosecond, so no two resets look alike."""

    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> _Marker:
        return cls(stat.st_ino, stat.st_mtime_ns)


def _digest(name: str, version: str) -> bytes:
    return hashlib.sha256(f"{name}:{version}".encode()).digest()


_CHUNK = 256  # scores ranked at once: 256 x 256 arrays, well under a millisecond


class DriftMonitor:
    """One model version's martingale and raised-alarm flag in this process."""

    def __init__(self, manifest: Manifest, level: float):
        self._calibration = np.asarray(manifest.calibration.scores, dtype=np.float64)
        self._seed = int.from_bytes(_digest(manifest.name, manifest.version)[:8], "big")
        self.level = level
        self.reset()

    def reset(self) -> None:
        self._martingale = PowerJumper()
        self._bag = OnlineConformal(self._calibration)
        self._uniforms = np.random.default_rng(self._seed)
        self.images = 0
        self.alarm = False

    @property
    def log10_martingale(self) -> float:
        return float(self._martingale.log10_capital[0])

    def observe(self, scores: Sequence[float]) -> None:
        """Bet on the smoothed p-values of ``scores`` (OOD scores, in the order they were served),
        ``_CHUNK`` at a time: ranking n scores at once builds n x n arrays, and a turn of the event
        loop can bring thousands. Sequential, so the chunks change nothing but the cost."""
        for start in range(0, len(scores), _CHUNK):
            chunk = scores[start : start + _CHUNK]
            p_values = self._bag.p_values(chunk, 1.0 - self._uniforms.random(len(chunk)))
            path = self._martingale.update_many(p_values)  # the alarm latches on any crossing, not only the last
            self.alarm |= bool(path.size and path.max() >= self.level)
            self.images += len(chunk)


class DriftAlarms:
    """The drift monitors of every loaded model version (none when the alarm is switched off)."""

    def __init__(
        self,
        manifests: Iterable[Manifest],
        metrics: ServiceMetrics,
        *,
        delta: float,
        workers: int,
        shared_directory: Path | None = None,
    ):
        self.delta = delta
        self.workers = workers
        level = alarm_log10_level(delta, workers)
        self._monitors = {(m.name, m.version): DriftMonitor(m, level) for m in manifests}
        self._metrics = metrics
        # Each model version's reset marker in the shared directory, named once: looked at per request.
        self._marker_files: dict[tuple[str, str], Path] = {}
        if shared_directory is not None:
            self._marker_files = {
                key: shared_directory / f"drift-reset-{_digest(*key).hex()[:16]}" for key in self._monitors
            }
        self._seen_resets: dict[tuple[str, str], _Marker | None] = {}
        for key in self._monitors:
            self._seen_resets[key] = self._reset_marker(*key)
            self._publish(*key)
        self._pending: dict[tuple[str, str], list[float]] = {}  # scores answered, not yet counted
        self._count_loop: asyncio.AbstractEventLoop | None = None  # the loop that will count them

    def observe(self, name: str, version: str, scores: Sequence[float]) -> None:
        """Count a request's images, in order, when this turn of the event loop ends (at once
        outside one); nothing when the alarm is off."""
        if (name, version) not in self._monitors:
            return
        self._pending.setdefault((name, version), []).extend(scores)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._count_pending()
            return
        if self._count_loop is not loop:  # none scheduled, or on a loop that has gone
            loop.call_soon(self._count_pending)
            self._count_loop = loop

    def _count_pending(self) -> None:
        """Count every pending score, each model version's in one step; a version whose count fails
        (its reset marker unreadable, say) is logged and loses its scores, not the others'."""
        self._count_loop = None
        while self._pending:
            (name, version), scores = self._pending.popitem()
            try:
                self._apply_shared_reset(name, version)
                self._monitors[(name, version)].observe(scores)
                self._publish(name, version)
            except Exception:
                logger.exception("drift alarm of %s:%s could not count %d scores", name, version, len(scores))

    def status(self, name: str, version: str) -> DriftStatus | None:
        """This process's state for a model version; ``None`` when the alarm is off."""
        monitor = self._monitors.get((name, version))
        if monitor is None:
            return None
        self._count_pending()
        self._apply_shared_reset(name, version)
        return self._describe(monitor)

    def _describe(self, monitor: DriftMonitor) -> DriftStatus:
        return DriftStatus(
            log10_martingale=monitor.log10_martingale,
            alarm=monitor.alarm,
            alarm_log10_level=monitor.level,
            images=monitor.images,
            delta=self.delta,
            workers=self.workers,
        )

    def reset(self, name: str, version: str) -> DriftStatus:
        """Back to capital 1 and no alarm, here and (at their next image or status) in every worker."""
        monitor = self._monitors.get((name, version))
        if monitor is None:
            raise InvalidParameter(ErrorCode.DRIFT_ALARM_OFF, "the drift alarm is switched off (MIXOE_DRIFT_ALARM)")
        self._count_pending()  # what was answered before the reset counts before it
        monitor.reset()
        marker = self._marker_files.get((name, version))
        if marker is not None:
            temporary = marker.with_name(f"{marker.name}.{os.getpid()}")
            temporary.write_text(uuid.uuid4().hex, encoding="ascii")
            now = time.time_ns()
            os.utime(temporary, ns=(now, now))  # to the nanosecond: a coarse file-system clock could repeat
            self._seen_resets[(name, version)] = _Marker.of(os.stat(temporary))
            os.replace(temporary, marker)  # other workers see either the old file or the new one
        self._publish(name, version)
        return self._describe(monitor)

    def _publish(self, name: str, version: str) -> None:
        monitor = self._monitors[(name, version)]
        self._metrics.record_drift(name, version, monitor.log10_martingale, monitor.alarm)

    def _reset_marker(self, name: str, version: str) -> _Marker | None:
        """The current reset marker's identity, from one ``stat`` (never read: this runs per request)."""
        marker = self._marker_files.get((name, version))
        if marker is None:
            return None
        try:
            return _Marker.of(os.stat(marker))
        except FileNotFoundError:
            return None

    def _apply_shared_reset(self, name: str, version: str) -> None:
        """Reset when another worker has reset this model version since this one last looked."""
        marker = self._reset_marker(name, version)
        if marker != self._seen_resets[(name, version)]:
            self._seen_resets[(name, version)] = marker
            self._monitors[(name, version)].reset()
            self._publish(name, version)
