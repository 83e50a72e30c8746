"""Prometheus metrics of one app instance, in its own registry (so apps and tests never share counts).

Names and labels are a contract with ``deploy/`` (alert rules, Grafana): base units, ``_total`` on
counters, only low-cardinality labels (model, version, operating point, decision, route template,
HTTP method or ``other``: see :mod:`service.api.access`), never file names or request ids.
``operating_point`` label values are the target ID acceptance as text, e.g. ``"0.95"``
(:func:`operating_point_label`).

``decision`` is ``accepted``, ``uncertain`` (looks in-distribution, but below the confidence the
request's risk level needs: ``models.calibration.selective``) or ``rejected`` (OOD).
The rejection rate is ``mixoe_predictions_total{decision="rejected"}`` over all predictions; its
calibrated expectation is ``mixoe_expected_rejection_ratio`` (= 1 - target ID acceptance) for the
same operating point, so a dashboard can plot one against the other and alert on drift.

``mixoe_ood_score`` needs fixed buckets for the life of the process: they are chosen at start-up
from the loaded bundles (:func:`score_buckets`): every operating point's threshold exactly (so the
``le="<threshold>"`` bucket counts the inputs that threshold accepts), calibration-score quantiles
(where ID traffic lands), and a few steps beyond the largest calibration score (where OOD traffic
lands). With several models, possibly with different score functions, the buckets are the union
over all of them: one histogram, one bucket layout, so replicas serving the same models aggregate.

With several worker processes (``MIXOE_WORKERS``) every process writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen when that variable is
set) and ``/metrics``, whichever worker answers it, reports the sum over all of them: counters and
histograms add up, the queue depth is the sum over live workers, and the per-model gauges, which
every worker sets to the same value, report it once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, multiprocess
from prometheus_client.registry import Collector

from models.calibration.selective import Decision
from models.contract.manifest import Manifest
from service.runtime.batch_loop.inference import padded_batch_sizes

_CALIBRATION_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
_BEYOND_CALIBRATION = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the calibration span above its maximum
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OPERATING_POINT_LABELS = ("model", "version", "operating_point")
_REQUEST_LABELS = ("route", "method", "status")  # the order service.api.access passes them in
MULTIPROCESS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")
_DECISION_LABELS: dict[Decision, str] = {"accept": "accepted", "uncertain": "uncertain", "reject": "rejected"}


def operating_point_label(target_id_acceptance: float) -> str:
    """``0.95 -> "0.95"``: the shortest text that reads back as the same target."""
    return f"{target_id_acceptance:g}"


def score_buckets(manifests: Iterable[Manifest]) -> list[float]:
    """Histogram bucket bounds for OOD scores, around the thresholds and calibration quantiles."""
    bounds: set[float] = set()
    for manifest in manifests:
        calibration = np.asarray(manifest.calibration.scores, dtype=np.float64)
        low, high = float(calibration[0]), float(calibration[-1])
        span = high - low if high > low else max(abs(high), 1.0)
        approximate = [
            *np.quantile(calibration, _CALIBRATION_QUANTILES),
            low,
            *(high + span * f for f in _BEYOND_CALIBRATION),
        ]
        bounds.update(float(f"{value:.6g}") for value in approximate)
        bounds.update(point.threshold for point in manifest.calibration.operating_points)  # exact, never rounded
    return sorted(bounds)


def multiprocess_directory() -> Path | None:
    """Where worker processes share their samples, when the service runs several (else ``None``)."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    return Path(directory) if directory else None


def forget_dead_workers(directory: Path) -> None:
    """Drop the live-gauge files of worker processes that no longer exist.

    A worker that crashed leaves its last queue depth behind (the supervisor starts a new one
    under another pid); without this it would be summed forever."""
    for path in directory.iterdir():
        match = _LIVE_GAUGE_FILE.match(path.name)
        if match and not _process_exists(int(match.group(1))):
            path.unlink(missing_ok=True)  # two workers answering scrapes may both get here


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


class _WorkersCollector(Collector):
    """Every worker's samples merged, after forgetting the workers that died since the last scrape."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._merged = multiprocess.MultiProcessCollector(None, str(directory))

    def collect(self) -> Iterable[Metric]:
        forget_dead_workers(self._directory)
        return self._merged.collect()


def _batch_size_buckets(max_batch_size: int) -> list[float]:
    return [float(size) for size in padded_batch_sizes(max_batch_size)]  # the sizes a GPU model runs at


class BatchMetrics:
    """The batch loop's measurements, as a ``service.runtime.batch_loop.host_tasks.BatchObserver``: images
    per batch, each image's wait in the loop's queue, model time per batch.

    Wherever the loop runs, the series are the same: a single server's loop reports into the app's
    registry; the model process (``MIXOE_MODEL_PROCESS``) makes its own, in no registry, and its
    samples reach every worker's ``/metrics`` through the multiprocess directory (which
    ``mixoe-serve`` always sets up when it starts a model process), added to the workers' empty
    ones. So a dashboard reads one set of series with or without a model process."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None):
        self.batch_size = Histogram(
            "mixoe_batch_size",
            "Images per model batch (with a model process: merged across workers).",
            buckets=_batch_size_buckets(max_batch_size),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "mixoe_queue_wait_seconds",
            "Time an image waits in the batching queue.",
            buckets=_QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "mixoe_inference_seconds", "Model time per batch.", buckets=_INFERENCE_BUCKETS, registry=registry
        )

    def batch_started(self, queue_waits: Sequence[float]) -> None:
        self.batch_size.observe(len(queue_waits))
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def batch_finished(self, seconds: float) -> None:
        self.inference.observe(seconds)


class ServiceMetrics:
    """Every collector the service exports, registered in a fresh :class:`CollectorRegistry`.

    ``registry`` is what ``/metrics`` exposes: these collectors themselves, or with several workers
    a collector that merges every worker's files."""

    def __init__(self, ood_score_buckets: Sequence[float], max_batch_size: int):
        registry = CollectorRegistry()
        shared = multiprocess_directory()
        if shared is None:
            self.registry = registry
        else:
            self.registry = CollectorRegistry()
            self.registry.register(_WorkersCollector(shared))
        self.predictions = Counter(
            "mixoe_predictions_total",
            "Images classified, by decision: accepted, uncertain (below the risk level's confidence) or "
            "rejected (OOD score above threshold).",
            ["model", "version", "operating_point", "decision"],
            registry=registry,
        )
        self.ood_score = Histogram(
            "mixoe_ood_score",
            "OOD score of each classified image (higher = more out-of-distribution).",
            ["model", "version"],
            buckets=list(ood_score_buckets),
            registry=registry,
        )
        self.threshold = Gauge(
            "mixoe_threshold",
            "Calibrated OOD-score threshold of each operating point.",
            _OPERATING_POINT_LABELS,
            registry=registry,
            multiprocess_mode="livemax",  # every worker loads the same bundles
        )
        self.expected_rejection_ratio = Gauge(
            "mixoe_expected_rejection_ratio",
            "Share of in-distribution images the operating point is calibrated to reject (1 - target).",
            _OPERATING_POINT_LABELS,
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "mixoe_model_info",
            "Loaded models (value 1), with their architecture, score function and manifest schema.",
            ["model", "version", "architecture", "score", "schema_version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.request_duration = Histogram(
            "mixoe_request_duration_seconds",
            "HTTP request latency by route template.",
            _REQUEST_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "mixoe_requests_total", "HTTP requests by route template.", _REQUEST_LABELS, registry=registry
        )
        self.batches = BatchMetrics(max_batch_size, registry)  # a single server's batch loop reports here
        self.queue_depth = Gauge(
            "mixoe_queue_depth",
            "Images waiting in the batching queues.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Each worker bets on its own traffic (service.monitoring.drift): livemax reports the highest live one.
        self.drift_log10_martingale, self.drift_alarm = (
            Gauge(name, documentation, ["model", "version"], registry=registry, multiprocess_mode="livemax")
            for name, documentation in (
                (
                    "mixoe_drift_log10_martingale",
                    "log10 of the drift alarm's conformal test martingale since its last reset (docs/drift.md).",
                ),
                (
                    "mixoe_drift_alarm",
                    "1 once the drift martingale has reached workers / delta since its last reset, else 0.",
                ),
            )
        )
        self.bad_inputs = Counter(
            "mixoe_bad_inputs_total", "Requests refused for bad input, by reason code.", ["reason"], registry=registry
        )

    def register_model(self, manifest: Manifest) -> None:
        """Publish a loaded model's identity, thresholds and expected rejection ratios."""
        name, version = manifest.name, manifest.version
        self.model_info.labels(
            name, version, manifest.architecture, manifest.score.name, str(manifest.schema_version)
        ).set(1)
        for point in manifest.calibration.operating_points:
            label = operating_point_label(point.target_id_acceptance)
            self.threshold.labels(name, version, label).set(point.threshold)
            self.expected_rejection_ratio.labels(name, version, label).set(round(1.0 - point.target_id_acceptance, 12))

    def record_prediction(self, model: str, version: str, target: float, score: float, decision: Decision) -> None:
        """Count one classified image by its decision and observe its OOD score."""
        self.predictions.labels(model, version, operating_point_label(target), _DECISION_LABELS[decision]).inc()
        self.ood_score.labels(model, version).observe(score)

    def record_drift(self, model: str, version: str, log10_martingale: float, alarm: bool) -> None:
        """Publish a model version's drift martingale and alarm (``service.monitoring.drift``)."""
        self.drift_log10_martingale.labels(model, version).set(log10_martingale)
        self.drift_alarm.labels(model, version).set(1 if alarm else 0)

    def queue_changed(self, delta: int) -> None:
        """The requests' report (``service.runtime.hosted.QueueObserver``): images handed to the
        batch loop (+) or answered (-)."""
        self.queue_depth.inc(delta)
