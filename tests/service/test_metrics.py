"""Metric helpers: bucket placement, label text, registry isolation, merging several workers' metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from models.contract.manifest import SCHEMA_VERSION
from models.runtime import Bundle
from service.monitoring.metrics import (
    MULTIPROCESS_DIRECTORY_VARIABLE,
    ServiceMetrics,
    operating_point_label,
    score_buckets,
)


def test_score_buckets_hold_every_threshold_exactly(bundle: Bundle) -> None:
    buckets = score_buckets([bundle.manifest])
    thresholds = [point.threshold for point in bundle.manifest.calibration.operating_points]
    assert all(threshold in buckets for threshold in thresholds)
    assert buckets == sorted(set(buckets))
    calibration = bundle.manifest.calibration.scores
    assert buckets[-1] > calibration[-1]  # room above the calibration range, where OOD traffic lands
    assert sum(calibration[0] <= bound <= calibration[-1] for bound in buckets) >= 8  # resolution where ID lands


def test_score_buckets_of_several_models_are_the_union(bundle: Bundle) -> None:
    shifted_scores = [score + 10.0 for score in bundle.manifest.calibration.scores]
    shifted_points = [
        point.model_copy(update={"threshold": shifted_scores[point.k - 1]})
        for point in bundle.manifest.calibration.operating_points
    ]
    calibration = bundle.manifest.calibration.model_copy(
        update={"scores": shifted_scores, "operating_points": shifted_points}
    )
    other = bundle.manifest.model_copy(update={"calibration": calibration})
    union = score_buckets([bundle.manifest, other])
    assert set(score_buckets([bundle.manifest])) | set(score_buckets([other])) == set(union)


def test_operating_point_labels_read_like_the_targets() -> None:
    assert [operating_point_label(t) for t in (0.9, 0.95, 0.99, 0.999)] == ["0.9", "0.95", "0.99", "0.999"]


def test_each_instance_has_its_own_registry(bundle: Bundle) -> None:
    first, second = ServiceMetrics([0.5], 8), ServiceMetrics([0.5], 8)
    first.register_model(bundle.manifest)
    first.record_prediction("tiny", "1", 0.95, 0.7, "reject")
    assert (
        first.registry.get_sample_value(
            "mixoe_predictions_total",
            {"model": "tiny", "version": "1", "operating_point": "0.95", "decision": "rejected"},
        )
        == 1.0
    )
    assert (
        second.registry.get_sample_value(
            "mixoe_predictions_total",
            {"model": "tiny", "version": "1", "operating_point": "0.95", "decision": "rejected"},
        )
        is None
    )
    text = generate_latest(first.registry).decode()
    assert 'mixoe_expected_rejection_ratio{model="tiny",operating_point="0.95",version="1"} 0.05' in text
    assert (
        f'mixoe_model_info{{architecture="resnet18",model="tiny",schema_version="{SCHEMA_VERSION}",score="msp",version="1"}} 1.0'
        in text
    )


_WORKER = """
import sys
from service.monitoring.metrics import ServiceMetrics

metrics = ServiceMetrics([0.5], 8)
for _ in range(int(sys.argv[1])):
    metrics.record_prediction("tiny", "1", 0.95, 0.7, "reject")
metrics.threshold.labels("tiny", "1", "0.95").set(0.6)
metrics.queue_changed(int(sys.argv[2]))
print("written", flush=True)
sys.stdin.readline()  # stay alive until the test closes stdin
"""


def _start_workers(directory: Path, *work: tuple[int, int]) -> list[subprocess.Popen[str]]:
    """One process per ``(predictions, queued images)``, started together; returns once all have written."""
    environment = os.environ | {MULTIPROCESS_DIRECTORY_VARIABLE: str(directory)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(predictions), str(queued)],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for predictions, queued in work
    ]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline() == "written\n"
    return workers


def _finish(worker: subprocess.Popen[str]) -> None:
    worker.communicate("\n", timeout=30)
    assert worker.returncode == 0


def test_workers_metrics_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several worker processes /metrics reports their sum, whichever worker answers it; a worker
    that exited (a crash, say) keeps its counts but no longer adds to the queue depth."""
    first, second, exited = _start_workers(tmp_path, (2, 4), (3, 1), (2, 7))
    try:
        monkeypatch.setenv(MULTIPROCESS_DIRECTORY_VARIABLE, str(tmp_path))
        merged = ServiceMetrics([0.5], 8).registry
        assert merged.get_sample_value("mixoe_queue_depth", {}) == 12.0
        _finish(exited)  # after the registry was built: each scrape looks again
        labels = {"model": "tiny", "version": "1", "operating_point": "0.95"}
        assert merged.get_sample_value("mixoe_predictions_total", labels | {"decision": "rejected"}) == 7.0
        assert merged.get_sample_value("mixoe_ood_score_count", {"model": "tiny", "version": "1"}) == 7.0
        assert merged.get_sample_value("mixoe_threshold", labels) == 0.6  # the same value in each: reported once
        assert merged.get_sample_value("mixoe_queue_depth", {}) == 5.0
    finally:
        _finish(first)
        _finish(second)
