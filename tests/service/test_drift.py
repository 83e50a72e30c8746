"""The drift alarm in the service: OOD-looking traffic raises it in /metrics and the model metadata,
in-distribution traffic does not, the admin reset clears it (behind the API key when keys are
set), and a reset reaches the other workers through the shared directory."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.runtime import Bundle
from service.app import create_app
from service.monitoring.drift import DriftAlarms
from service.monitoring.metrics import ServiceMetrics, score_buckets
from service.settings import Settings
from tests.service.helpers import TinyModel, role_files, sample_value

LABELS = {"model": "tiny", "version": "1"}
KEY = "drift-secret"


@pytest.fixture
def fresh(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def _drift(client: TestClient) -> dict:
    return client.get("/v2/models/tiny").json()["drift"]


def _gauges(client: TestClient) -> tuple[float, float]:
    text = client.get("/metrics").text
    return sample_value(text, "mixoe_drift_log10_martingale", LABELS), sample_value(text, "mixoe_drift_alarm", LABELS)


def test_ood_looking_images_raise_the_alarm_and_a_reset_clears_it(fresh: TestClient, tiny: TinyModel) -> None:
    assert _drift(fresh) == {
        "log10_martingale": 0.0, "alarm": False, "alarm_log10_level": 2.0, "images": 0, "delta": 0.01, "workers": 1,
    }  # fmt: skip
    # Every "rejected" image scores above 199 of the 200 calibration scores: p-value at most 2/201.
    assert fresh.post("/predict", files=role_files(tiny, *["rejected"] * 12)).status_code == 200
    drift = _drift(fresh)
    assert drift["alarm"] and drift["images"] == 12 and drift["log10_martingale"] >= 2.0
    assert _gauges(fresh) == (pytest.approx(drift["log10_martingale"]), 1.0)

    reset = fresh.post("/v2/models/tiny/drift/reset")
    assert reset.status_code == 200
    assert (reset.json()["alarm"], reset.json()["images"], reset.json()["log10_martingale"]) == (False, 0, 0.0)
    assert _gauges(fresh) == (0.0, 0.0)
    assert _drift(fresh)["alarm"] is False


def test_in_distribution_images_leave_the_alarm_down(fresh: TestClient, tiny: TinyModel) -> None:
    assert fresh.post("/predict", files=role_files(tiny, *["accepted"] * 12)).status_code == 200
    drift = _drift(fresh)
    assert not drift["alarm"] and drift["images"] == 12 and drift["log10_martingale"] < 0.0
    assert _gauges(fresh)[1] == 0.0


def test_the_alarm_level_is_split_between_workers(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(workers=4, drift_delta=0.05))) as client:
        assert _drift(client)["alarm_log10_level"] == pytest.approx(math.log10(4 / 0.05))


def test_reset_needs_an_api_key_when_keys_are_set(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(api_keys=[KEY]))) as client:
        refused = client.post("/v2/models/tiny/drift/reset")
        assert (refused.status_code, refused.json()["code"]) == (401, "unauthorized")
        assert client.post("/v2/models/tiny/versions/1/drift/reset", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/v2/models/tiny/drift/reset", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/v2/models/tiny").status_code == 200  # metadata stays open


def test_reset_of_an_unknown_model_is_404(fresh: TestClient) -> None:
    response = fresh.post("/v2/models/nope/drift/reset")
    assert (response.status_code, response.json()["code"]) == (404, "unknown_model")
    response = fresh.post("/v2/models/tiny/versions/9/drift/reset")
    assert (response.status_code, response.json()["code"]) == (404, "unknown_model")


def test_switched_off_there_is_no_martingale(make_settings: Callable[..., Settings], tiny: TinyModel) -> None:
    with TestClient(create_app(make_settings(drift_alarm=False))) as client:
        assert client.post("/predict", files=role_files(tiny, *["rejected"] * 12)).status_code == 200
        assert _drift(client) is None
        assert "mixoe_drift_alarm{" not in client.get("/metrics").text
        response = client.post("/v2/models/tiny/drift/reset")
        assert (response.status_code, response.json()["code"]) == (422, "drift_alarm_off")


def test_a_reset_in_one_worker_reaches_the_others(bundle: Bundle, tmp_path: Path) -> None:
    manifest = bundle.manifest
    workers = [
        DriftAlarms(
            [manifest], ServiceMetrics(score_buckets([manifest]), 4), delta=0.01, workers=2, shared_directory=tmp_path
        )
        for _ in range(2)
    ]
    high = manifest.calibration.scores[-1] + 1.0  # above every calibration score: p-value below 1/201
    for alarms in workers:
        alarms.observe("tiny", "1", [high] * 12)
        assert alarms.status("tiny", "1").alarm  # type: ignore[union-attr]
    workers[0].reset("tiny", "1")
    other = workers[1].status("tiny", "1")
    assert other is not None and (other.alarm, other.images) == (False, 0)
    workers[1].observe("tiny", "1", [high])
    assert workers[1].status("tiny", "1").images == 1  # type: ignore[union-attr]  # reset once, not at every look


def test_an_unchanged_reset_marker_is_not_read_and_every_reset_still_arrives(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bundle.manifest
    metrics = ServiceMetrics(score_buckets([manifest]), 4)
    resetter, worker = (
        DriftAlarms([manifest], metrics, delta=0.01, workers=2, shared_directory=tmp_path) for _ in range(2)
    )
    resetter.reset("tiny", "1")
    opened: list[Path] = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))
    for _ in range(3):  # several resets in quick succession, each applied exactly once
        worker.observe("tiny", "1", [0.5, 0.5])
        worker.observe("tiny", "1", [0.5])
        assert worker.status("tiny", "1").images == 3  # type: ignore[union-attr]
        resetter.reset("tiny", "1")
        assert worker.status("tiny", "1").images == 0  # type: ignore[union-attr]
    assert not [path for path in opened if path.parent == tmp_path and not path.name.endswith(f".{os.getpid()}")]


def test_on_the_event_loop_one_turns_requests_are_counted_together_with_the_same_martingale(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bundle.manifest
    calibration = manifest.calibration.scores
    requests = [[calibration[i % len(calibration)] + 0.3 * (i % 3)] * (1 + i % 2) for i in range(40)]

    def alarms() -> DriftAlarms:
        return DriftAlarms([manifest], ServiceMetrics(score_buckets([manifest]), 4), delta=0.01, workers=1)

    one_by_one = alarms()  # outside an event loop each request is counted at once
    for scores in requests:
        one_by_one.observe("tiny", "1", scores)
    counted: list[int] = []
    together = alarms()
    monitor = together._monitors[("tiny", "1")]
    real_observe = monitor.observe
    monkeypatch.setattr(monitor, "observe", lambda scores: counted.append(len(scores)) or real_observe(scores))

    async def one_turn() -> None:
        for scores in requests:
            together.observe("tiny", "1", scores)
        assert counted == []  # not yet: at the end of this turn
        await asyncio.sleep(0)

    asyncio.run(one_turn())
    assert counted == [sum(map(len, requests))]  # one update for the whole turn
    assert together.status("tiny", "1") == one_by_one.status("tiny", "1")


def test_a_status_or_reset_in_the_same_turn_counts_what_was_answered_before_it(bundle: Bundle) -> None:
    manifest = bundle.manifest
    alarms = DriftAlarms([manifest], ServiceMetrics(score_buckets([manifest]), 4), delta=0.01, workers=1)
    high = manifest.calibration.scores[-1] + 1.0

    async def one_turn() -> None:
        alarms.observe("tiny", "1", [high] * 3)
        assert alarms.status("tiny", "1").images == 3  # type: ignore[union-attr]
        alarms.observe("tiny", "1", [high] * 2)
        assert alarms.reset("tiny", "1").images == 0  # the 2 counted before the reset, not after it
        await asyncio.sleep(0)

    asyncio.run(one_turn())
    assert alarms.status("tiny", "1").images == 0  # type: ignore[union-attr]


def test_scores_left_pending_by_a_loop_that_stopped_are_counted_on_the_next_one(bundle: Bundle) -> None:
    manifest = bundle.manifest
    alarms = DriftAlarms([manifest], ServiceMetrics(score_buckets([manifest]), 4), delta=0.01, workers=1)

    stopping = asyncio.new_event_loop()

    def observe_and_stop() -> None:
        alarms.observe("tiny", "1", [0.5])
        stopping.stop()  # callbacks scheduled by this one, the count among them, never run

    stopping.call_soon(observe_and_stop)
    stopping.run_forever()
    stopping.close()
    assert alarms._pending  # left pending by the stopped loop

    async def next_loop() -> None:
        alarms.observe("tiny", "1", [0.5, 0.5])
        await asyncio.sleep(0)
        assert alarms._pending == {}  # counted here, not left for a status to find

    asyncio.run(next_loop())
    assert alarms.status("tiny", "1").images == 3  # type: ignore[union-attr]
