"""``MIXOE_MODEL_PROCESS``: one process holds the models and merges the batches of every worker.

The host's loop is driven step by step in this process (deterministic: which runs merge depends
only on what is queued), then the real thing: ``mixoe-serve`` with two workers and a model
process answers as the bundle does, and stops when the model process dies.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram

from models.runtime import Bundle, load_bundle
from service.api.admission import Admission
from service.api.errors import ErrorCode, InvalidInput, NotReady
from service.local import LocalServer, log_entries, start_local_server
from service.monitoring.metrics import BatchMetrics, ServiceMetrics, score_buckets
from service.runtime.hosted import HostedModel
from service.runtime.decoding import decode_image
from service.runtime.batch_loop.inference import ModelRunner
from service.runtime.verdicts import ImageJob, ImageVerdict
from service.runtime.model_client import ADDRESS_VARIABLE, KEY_VARIABLE, HostClient
import service.runtime.batch_loop.host_tasks
import service.runtime.predictor
from service.runtime.batch_loop.host_tasks import LoadDone, Release, Task
from service.runtime.batch_loop.model_host import ModelHost
from service.runtime.batch_loop.model_process import ModelProcess
from service.runtime.predictor import Predictor, Upload
from service.runtime.protocol import Answer, Failed, Judged, Load, Loaded, ModelKey, Ping, Pong, Reply, Run, model_key
from service.runtime.registry import LoadedModel
from service.settings import Settings
from tests.service.helpers import TinyModel, build_tiny_bundle, role_files, sample_value

ROLES = ("accepted", "borderline", "rejected")


class Inbox:
    """Stands in for a worker's connection: keeps the replies the host sends it (every task here
    is call 0)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.closed = False

    def send(self, message: Answer | list[Answer]) -> None:
        assert not self.closed, "answered after its release"
        for answer in message if isinstance(message, list) else [message]:
            assert answer.number == 0
            self.replies.append(answer.reply)

    def close(self) -> None:
        self.closed = True


def verdicts_in(inbox: Inbox) -> list[list[ImageVerdict | None]]:
    """The verdicts of each of ``inbox``'s replies, which must all be :class:`Judged`."""
    assert all(isinstance(reply, Judged) for reply in inbox.replies), inbox.replies
    return [reply.verdicts for reply in inbox.replies if isinstance(reply, Judged)]


def crops(bundle: Bundle, tiny: TinyModel, roles: tuple[str, ...]) -> list[np.ndarray]:
    """The reference images' crops, as a worker sends them."""
    images = [decode_image(tiny.images[role], max_bytes=10**8, max_pixels=10**8) for role in roles]
    return [bundle.pixels(image).numpy() for image in images]


def jpeg(tiny: TinyModel, role: str) -> bytes:
    """A reference image as a plain JPEG (they are PNGs)."""
    encoded = io.BytesIO()
    decode_image(tiny.images[role], max_bytes=10**8, max_pixels=10**8).save(encoded, "JPEG", quality=95)
    return encoded.getvalue()


def run(bundle: Bundle, images: list[Any], target: float = 0.95, top_k: int = 2) -> Run:
    """A worker's run of ``images`` (crops and JPEG bytes); its verdicts come crops first."""
    arrays = [image for image in images if isinstance(image, np.ndarray)]
    size = bundle.manifest.preprocessing.input_size
    stacked = np.stack(arrays) if arrays else np.empty((0, 3, size, size), dtype=np.uint8)
    jpegs = [image for image in images if isinstance(image, bytes)]
    return Run(model_key(bundle), stacked, jpegs, bundle.operating_point(target), top_k)


def host_with_batches(max_batch_size: int, decodes_jpeg: bool = False) -> tuple[ModelHost, Histogram]:
    """A host on the CPU that schedules batches as on a GPU (the next launched before the one in
    flight is answered), where the order of answers is what a test checks; and its batch sizes."""
    batches = BatchMetrics(max_batch_size, CollectorRegistry())
    return ModelHost(torch.device("cpu"), max_batch_size, batches, decodes_jpeg, pipelined=True), batches.batch_size


def load(host: ModelHost, model: ModelKey, inbox: Inbox) -> None:
    """Ask for ``model`` and run the host's tasks until it answers: a first load runs in a thread
    of its own, whose end is a task, and each warm-up batch is one more."""
    answered = len(inbox.replies)
    host.submit(Task(inbox, Load(model)))
    for _ in range(10):
        host.step()
        if len(inbox.replies) > answered:
            return
    raise AssertionError(f"no answer to a load after 10 tasks: {inbox.replies}")


def loaded_by(host: ModelHost, model: ModelKey, *inboxes: Inbox, decodes_jpeg: bool = False) -> None:
    for inbox in inboxes:
        load(host, model, inbox)
        reply = inbox.replies.pop()
        assert isinstance(reply, Loaded) and reply.decodes_jpeg == decodes_jpeg


def batch_total(batches: Histogram, suffix: str = "_count") -> float:
    return next(s.value for m in batches.collect() for s in m.samples if s.name.endswith(suffix))


def assert_same_verdict(got: ImageVerdict, want: ImageVerdict) -> None:
    """Equal but for float noise: a batch's composition changes the CPU kernels' rounding."""
    assert (got.label, got.accepted, got.threshold, [label for label, _ in got.top_k]) == (
        want.label, want.accepted, want.threshold, [label for label, _ in want.top_k]
    )
    assert got.score == pytest.approx(want.score, abs=1e-5)


def test_runs_waiting_together_merge_into_one_batch_with_the_in_process_verdicts(
    tiny: TinyModel, bundle: Bundle
) -> None:
    host, batches = host_with_batches(max_batch_size=8)
    first, second = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES[:2]))))
    host.submit(Task(second, run(bundle, crops(bundle, tiny, ROLES[2:]), target=0.9, top_k=1)))
    host.step()  # one step answers both
    assert batch_total(batches) == 1
    [verdicts] = verdicts_in(first)
    [other_verdicts] = verdicts_in(second)
    assert len(verdicts) == 2 and len(other_verdicts) == 1
    # Each worker's rows are judged at its own operating point and top-k, as in its own process.
    reference = ModelRunner(bundle)
    expected = reference(
        [ImageJob(torch.from_numpy(crop), bundle.operating_point(0.95), 2) for crop in crops(bundle, tiny, ROLES[:2])]
    ) + reference(
        [ImageJob(torch.from_numpy(crop), bundle.operating_point(0.9), 1) for crop in crops(bundle, tiny, ROLES[2:])]
    )
    for got, want in zip(verdicts + other_verdicts, expected, strict=True):
        assert_same_verdict(got, want)
    assert [verdict.accepted for verdict in verdicts + other_verdicts] == [True, True, False]


def test_a_run_that_would_overflow_the_batch_or_needs_another_model_goes_next(
    tiny: TinyModel, bundle: Bundle, tmp_path: Path
) -> None:
    other = build_tiny_bundle(tmp_path / "repository", version="2", seed=1)
    host, batches = host_with_batches(max_batch_size=4)
    first, second, third = Inbox(), Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    loaded_by(host, model_key(load_bundle(other.path)), third)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES))))  # 3 images
    host.submit(Task(second, run(bundle, crops(bundle, tiny, ROLES[:2]))))  # 3 + 2 > 4
    host.submit(Task(third, run(load_bundle(other.path), crops(bundle, tiny, ROLES[:1]))))
    # While runs keep coming, a batch is answered once the next one has been launched.
    host.step()
    assert [len(first.replies), len(second.replies), len(third.replies)] == [0, 0, 0]
    host.step()
    assert [len(first.replies), len(second.replies), len(third.replies)] == [1, 0, 0]
    host.step()  # another model's run, not merged; and the last: answered at once
    assert [len(first.replies), len(second.replies), len(third.replies)] == [1, 1, 1]
    assert batch_total(batches) == 3


def test_a_ping_goes_ahead_of_the_queued_runs(tiny: TinyModel, bundle: Bundle) -> None:
    """The heartbeat asks whether the loop turns: a long queue of runs must not look like a hang."""
    host, batches = host_with_batches(max_batch_size=1)
    worker, heartbeat = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), worker)
    for role in ROLES:
        host.submit(Task(worker, run(bundle, crops(bundle, tiny, [role]))))
    host.submit(Task(heartbeat, Ping()))
    host.step()
    assert heartbeat.replies == [Pong()] and worker.replies == [] and batch_total(batches) == 0
    while len(worker.replies) < len(ROLES):
        host.step()
    assert batch_total(batches) == len(ROLES)  # the runs, in their order, after it


def test_a_batch_in_flight_that_fails_fails_only_its_own_runs(
    tiny: TinyModel, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _ = host_with_batches(max_batch_size=3)
    first, second = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    real_judge = ModelRunner.judge
    judged = []

    def judge_failing_first(runner: ModelRunner, *args: Any) -> list[ImageVerdict]:
        judged.append(len(judged))
        if len(judged) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_judge(runner, *args)

    monkeypatch.setattr(ModelRunner, "judge", judge_failing_first)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES))))  # a full batch
    host.submit(Task(second, run(bundle, crops(bundle, tiny, ROLES[:1]))))
    host.step()  # the first batch in flight, the second next in line
    assert first.replies == [] and second.replies == []
    host.step()  # the second launched, the first failing as it is judged; nothing next: the second answered
    assert first.replies == [Failed("RuntimeError: CUDA error: an illegal memory access was encountered")]
    [verdicts] = verdicts_in(second)
    assert len(verdicts) == 1


def test_jpegs_are_decoded_in_the_model_process_and_one_its_decoder_refuses_comes_back_as_none(
    tiny: TinyModel, bundle: Bundle
) -> None:
    host, batches = host_with_batches(max_batch_size=8, decodes_jpeg=True)
    inbox = Inbox()
    loaded_by(host, model_key(bundle), inbox, decodes_jpeg=True)  # the worker learns to send JPEGs undecoded
    truncated = jpeg(tiny, "rejected")[:300]
    images = [jpeg(tiny, "accepted"), *crops(bundle, tiny, ("borderline",)), truncated]
    host.submit(Task(inbox, run(bundle, images)))
    host.step()
    [[cropped, decoded, refused]] = verdicts_in(inbox)  # the crops' verdicts first
    assert refused is None
    assert batch_total(batches, "_sum") == 2  # the refused file never reached the model
    # On the CPU torchvision decodes a plain JPEG exactly as PIL does: the same verdict as the crop
    # a worker would have made of it.
    pil_crop = bundle.pixels(decode_image(jpeg(tiny, "accepted"), max_bytes=10**8, max_pixels=10**8))
    point = bundle.operating_point(0.95)
    [reference, reference_cropped] = ModelRunner(bundle)(
        [ImageJob(pil_crop, point, 2), ImageJob(torch.from_numpy(crops(bundle, tiny, ("borderline",))[0]), point, 2)]
    )
    assert_same_verdict(decoded, reference)
    assert_same_verdict(cropped, reference_cropped)
    assert decoded.accepted and cropped.accepted


class RefusingModelProcess:
    """A model process that refuses every JPEG it is sent, and runs the crops."""

    timeout_s = 10.0

    def __init__(self, bundle: Bundle):
        self._runner = ModelRunner(bundle)
        self.refused = 0
        self.crops = 0

    async def load(self, model: ModelKey) -> Loaded:
        return Loaded(decodes_jpeg=True, batch_limit=8)

    async def call(self, run: Run, expected: type, timeout_s: float) -> Judged:
        self.refused += len(run.jpegs)
        self.crops += len(run.crops)
        jobs = [ImageJob(torch.from_numpy(crop), run.point, run.top_k) for crop in run.crops]
        return Judged([*(self._runner(jobs) if jobs else []), *([None] * len(run.jpegs))])


def test_a_worker_lets_pil_decide_on_a_jpeg_the_model_process_refused(
    tiny: TinyModel, bundle: Bundle, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JPEG the GPU decoder refused gets PIL's verdict: decoded once (by PIL, not by torchvision
    first) and classified as any other image when PIL reads it, and the client error naming the
    file when PIL cannot either."""
    runner = RefusingModelProcess(bundle)
    decoded: list[str] = []  # by whom, each time a worker decodes a file
    real_load_image = service.runtime.predictor.load_image
    real_decode_plain_jpeg = service.runtime.predictor.decode_plain_jpeg

    def counted_load_image(image: Any, filename: str) -> Any:
        decoded.append(f"PIL {filename}")
        return real_load_image(image, filename)

    def counted_decode_plain_jpeg(data: bytes, device: torch.device) -> Any:
        decoded.append("torchvision")
        return real_decode_plain_jpeg(data, device)

    monkeypatch.setattr(service.runtime.predictor, "load_image", counted_load_image)
    monkeypatch.setattr(service.runtime.predictor, "decode_plain_jpeg", counted_decode_plain_jpeg)
    settings = make_settings()
    metrics = ServiceMetrics(score_buckets([bundle.manifest]), 8)

    async def predict(uploads: list[Upload]) -> list[ImageVerdict]:
        with ThreadPoolExecutor(2) as decoding:
            hosted = HostedModel(runner, bundle, metrics)  # type: ignore[arg-type]
            await hosted.warm_up()
            await hosted.start()
            model = LoadedModel(bundle, hosted, sends_jpeg=hosted.decodes_jpeg)
            return await Predictor(settings, metrics, decoding).predict(
                model, uploads, operating_point=None, top_k=None, ticket=Admission(64, 1).ticket()
            )

    verdicts = asyncio.run(
        predict([Upload("accepted.jpg", jpeg(tiny, "accepted")), Upload("rejected.png", tiny.images["rejected"])])
    )
    assert (runner.refused, runner.crops) == (1, 2)  # the JPEG's bytes once, then its crop once
    assert sorted(decoded) == ["PIL accepted.jpg", "PIL rejected.png"]
    pil_crop = bundle.pixels(decode_image(jpeg(tiny, "accepted"), max_bytes=10**8, max_pixels=10**8))
    assert_same_verdict(verdicts[0], ModelRunner(bundle)([ImageJob(pil_crop, bundle.operating_point(None), 3)])[0])
    assert [verdict.accepted for verdict in verdicts] == [True, False]
    with pytest.raises(InvalidInput) as refused:
        cut = jpeg(tiny, "accepted")
        asyncio.run(predict([Upload("cut.jpg", cut[: cut.index(b"\xff\xda") + 20])]))  # cut in its scan
    assert (refused.value.code, refused.value.file) == (ErrorCode.TRUNCATED_IMAGE, "cut.jpg")
    assert decoded[2:] == ["PIL cut.jpg"] and runner.refused == 2  # refused, then decoded once, never resent


def test_a_model_still_loading_holds_up_no_run_of_another(
    tiny: TinyModel, bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP roll-over's new workers load the new version while the old workers go on serving."""
    other = build_tiny_bundle(tmp_path / "repository", version="2")
    host, _ = host_with_batches(max_batch_size=4)
    serving, rolling = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), serving)
    release_load = threading.Event()
    real_load = service.runtime.batch_loop.host_tasks.load_bundle

    def slow_load(path: Path, device: torch.device) -> Bundle:
        assert release_load.wait(30)
        return real_load(path, device)

    monkeypatch.setattr(service.runtime.batch_loop.host_tasks, "load_bundle", slow_load)
    # Three warm-up batch sizes, as a GPU model would have (on a CPU there is one).
    monkeypatch.setattr(
        ModelRunner, "for_device", lambda bundle, max_batch_size, cuda_graphs, tune: ModelRunner(bundle, [1, 2, 4])
    )
    host.submit(Task(rolling, Load(model_key(load_bundle(other.path)))))
    host.step()  # the load starts, in its own thread
    host.submit(Task(serving, run(bundle, crops(bundle, tiny, ROLES))))
    host.step()
    assert [type(reply) for reply in serving.replies] == [Judged] and rolling.replies == []
    release_load.set()
    host.step()  # loaded: its warm-up is queued
    host.submit(Task(serving, run(bundle, crops(bundle, tiny, ROLES))))
    host.step()  # the first warm-up batch; the next one queues behind the run waiting meanwhile
    host.step()
    assert [type(reply) for reply in serving.replies] == [Judged, Judged] and rolling.replies == []
    host.step()
    host.step()
    assert rolling.replies == [Loaded(False, 4)]


def test_the_warm_up_runs_in_the_thread_that_serves(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch caches cuDNN's plans per thread: warmed up in the loading thread, a GPU model built
    each plan again at its first batch of each size while serving (2-3 s stalls on an H200)."""
    warmed_in = []
    real_warm_up = ModelRunner.warm_up

    def recorded_warm_up(runner: ModelRunner, sizes: list[int] | None = None) -> None:
        warmed_in.append(threading.current_thread())
        real_warm_up(runner, sizes)

    monkeypatch.setattr(ModelRunner, "warm_up", recorded_warm_up)
    host, _ = host_with_batches(max_batch_size=4)
    loaded_by(host, model_key(bundle), Inbox())
    assert warmed_in == [threading.current_thread()]


def test_workers_waiting_on_one_load_get_one_copy_and_one_that_left_meanwhile_gets_nothing(
    tiny: TinyModel, bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, _ = host_with_batches(max_batch_size=4)
    first, second, third = Inbox(), Inbox(), Inbox()
    loads = []
    real_load = service.runtime.batch_loop.host_tasks.load_bundle

    def counted_load(path: Path, device: torch.device) -> Bundle:
        loads.append(path)
        return real_load(path, device)

    monkeypatch.setattr(service.runtime.batch_loop.host_tasks, "load_bundle", counted_load)
    for inbox in (first, second, third):
        host.submit(Task(inbox, Load(model_key(bundle))))
        host.step()
    host.submit(Task(second, Release()))
    host.step()
    host.step()  # the load's end
    host.step()  # its warm-up (one batch size on a CPU)
    assert loads == [tiny.path] and second.closed and second.replies == []
    assert first.replies == third.replies == [Loaded(False, 4)]
    for inbox in (first, third):
        host.submit(Task(inbox, Release()))
        host.step()
    assert host.loaded == []
    # Everyone gone before the load ends: the model is dropped as soon as it is loaded.
    host.submit(Task(first, Load(model_key(bundle))))
    host.step()
    host.submit(Task(first, Release()))
    host.step()
    host.step()  # the load's end
    host.step()  # its warm-up, given up: nobody is waiting
    assert host.loaded == [] and len(loads) == 2
    again = Inbox()
    load(host, model_key(bundle), again)  # loaded afresh, not stuck behind the load given up
    assert again.replies == [Loaded(False, 4)] and len(loads) == 3


def test_a_model_is_released_when_the_last_worker_that_loaded_it_disconnects(tiny: TinyModel, bundle: Bundle) -> None:
    host, _ = host_with_batches(max_batch_size=4)
    first, second = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    host.submit(Task(first, Release()))
    host.step()
    assert host.loaded == [model_key(bundle)]
    host.submit(Task(second, Release()))
    host.step()
    assert host.loaded == []


def test_a_run_for_a_model_nobody_loaded_or_a_broken_bundle_is_an_error_answer(
    tiny: TinyModel, bundle: Bundle, tmp_path: Path
) -> None:
    host, _ = host_with_batches(max_batch_size=4)
    inbox = Inbox()
    host.submit(Task(inbox, run(bundle, crops(bundle, tiny, ROLES[:1]))))
    host.step()
    broken = build_tiny_bundle(tmp_path / "repository")
    broken_key = model_key(load_bundle(broken.path))
    (broken.path / "weights.safetensors").write_bytes(b"not the weights the manifest hashed")
    load(host, broken_key, inbox)
    republished = (str(tiny.path), "0" * 64)  # the path the worker loaded, but another manifest now
    load(host, republished, inbox)
    assert all(isinstance(reply, Failed) for reply in inbox.replies)
    [message, load_message, changed_message] = [reply.message for reply in inbox.replies if isinstance(reply, Failed)]
    assert "not loaded" in message
    assert "weights.safetensors" in load_message
    assert "changed on disk" in changed_message
    assert host.loaded == []


def test_a_worker_without_a_model_process_is_told_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_VARIABLE, raising=False)
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match="mixoe-serve starts it"):
        HostClient.from_environment(timeout_s=10)


def test_a_model_process_that_does_not_answer_is_a_503_not_a_500(tmp_path: Path) -> None:
    client = HostClient.over_socket(str(tmp_path / "no-socket-here"), b"key", timeout_s=10)
    with pytest.raises(NotReady, match="not answering"):
        asyncio.run(client.load(("anything", "0" * 64)))
    assert not client.answering


def test_the_model_process_refuses_a_wrong_key_and_outlives_a_dropped_handshake(
    tiny: TinyModel, bundle: Bundle, make_settings: Callable[..., Settings]
) -> None:
    model_process = ModelProcess(make_settings())
    model_process.start()

    async def load_with(client: HostClient) -> Loaded:
        try:
            return await client.load(model_key(bundle))
        finally:
            await client.close()

    async def not_a_request() -> None:
        client = HostClient.from_environment(timeout_s=10)
        try:
            await client.call(LoadDone(model_key(bundle), None), Loaded, 10)  # type: ignore[arg-type]
        finally:
            await client.close()

    async def serve(client: HostClient) -> tuple[Loaded, Judged]:
        try:
            loaded = await client.load(model_key(bundle))
            return loaded, await client.call(run(bundle, crops(bundle, tiny, ROLES)), Judged, 10)
        finally:
            await client.close()

    try:
        address = os.environ[ADDRESS_VARIABLE]
        with pytest.raises(NotReady):
            asyncio.run(load_with(HostClient.over_socket(address, b"not the key", timeout_s=10)))
        with socket.socket(socket.AF_UNIX) as dropped:  # connects, then leaves mid-handshake
            dropped.connect(address)
        with pytest.raises(NotReady):  # not a request a worker sends: the connection is dropped
            asyncio.run(not_a_request())
        with socket.socket(socket.AF_UNIX) as stalled:  # connects and says nothing: holds up no one else
            stalled.connect(address)
            loaded, judged = asyncio.run(serve(HostClient.from_environment(timeout_s=10)))
            assert loaded.decodes_jpeg is False
            assert [verdict.accepted for verdict in judged.verdicts if verdict] == [True, True, False]
    finally:
        model_process.stop()
    assert ADDRESS_VARIABLE not in os.environ and not model_process.died


def start_with_model_process(
    tiny: TinyModel, log: Path, workers: str, timeout_s: str = "30", **settings: str
) -> LocalServer:
    return start_local_server(
        {"model_repository": str(tiny.repository), "device": "cpu", "decode_workers": "2", "workers": workers,
         "model_process": "true", "model_process_timeout_s": timeout_s, "batch_size_tuning": "false"} | settings,
        log,
        timeout_s=90,
    )


def model_process_pid(log: Path) -> int:
    [pid] = {entry["pid"] for entry in log_entries(log) if entry["logger"] == "mixoe.model_process"}
    return pid


@pytest.mark.parametrize(("workers", "model_threads"), [("1", None), ("2", "3")])
def test_workers_share_one_model_process_which_outlives_a_group_sigterm_and_stops_with_them(
    tiny: TinyModel, tmp_path: Path, workers: str, model_threads: str | None
) -> None:
    """With ``model_threads`` the model process's loop (warm-up included) runs on that many threads."""
    log = tmp_path / "model-process.log"
    served = start_with_model_process(tiny, log, workers, **({"model_threads": model_threads} if model_threads else {}))
    try:
        pid = model_process_pid(log)
        # What a SIGTERM to the whole process group does to it: nothing (the workers drain through it).
        os.kill(pid, signal.SIGTERM)
        for _ in range(2 * int(workers)):  # a new connection each: every worker, likely
            response = httpx.post(f"{served.url}/predict", files=role_files(tiny, *ROLES), timeout=30)
            assert response.status_code == 200, response.text
            assert [p["accepted"] for p in response.json()["predictions"]] == [True, True, False]
        metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
        # the model process's batches, reported under the single server's names (the workers form none)
        assert sample_value(metrics, "mixoe_batch_size_sum") == 2 * int(workers) * len(ROLES)
        assert sample_value(metrics, "mixoe_queue_wait_seconds_count") == 2 * int(workers) * len(ROLES)
        assert sample_value(metrics, "mixoe_inference_seconds_count") == sample_value(metrics, "mixoe_batch_size_count") > 0
        assert sample_value(metrics, "mixoe_requests_total", {"route": "/predict", "status": "200"}) == 2 * int(workers)
        loads = [e for e in log_entries(log) if str(e["message"]).startswith("batch loop loaded")]
        assert len(loads) == 1  # one copy, whatever the number of workers
        if model_threads:
            assert f"on cpu, {model_threads} intra-op threads" in loads[0]["message"]
    finally:
        status = served.stop()
    assert status == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_service_stops_with_status_1_when_the_model_process_dies(tiny: TinyModel, tmp_path: Path) -> None:
    log = tmp_path / "model-process.log"
    served = start_with_model_process(tiny, log, "2")
    try:
        os.kill(model_process_pid(log), signal.SIGKILL)
        served.process.wait(timeout=60)
    finally:
        status = served.stop()
    assert status == 1
    assert any("the model process" in e["message"] and "status -9" in e["message"] for e in log_entries(log))


def test_on_a_cpu_each_batch_is_answered_before_the_next_is_launched(tiny: TinyModel, bundle: Bundle) -> None:
    """A CPU's forward pass has finished when it returns: holding its answers while the next batch
    computes would only add that batch's time to their latency."""
    host = ModelHost(torch.device("cpu"), 3, BatchMetrics(3, CollectorRegistry()))
    first, second = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), first, second)
    host.submit(Task(first, run(bundle, crops(bundle, tiny, ROLES))))  # a full batch
    host.submit(Task(second, run(bundle, crops(bundle, tiny, ROLES[:1]))))
    host.step()
    assert len(verdicts_in(first)) == 1 and second.replies == []


def test_a_run_whose_deadline_passed_in_the_queue_is_dropped_unrun(tiny: TinyModel, bundle: Bundle) -> None:
    host, batches = host_with_batches(max_batch_size=8)
    late, on_time = Inbox(), Inbox()
    loaded_by(host, model_key(bundle), late, on_time)
    host.submit(Task(late, run(bundle, crops(bundle, tiny, ROLES)), deadline=time.monotonic() - 1))
    host.submit(Task(on_time, run(bundle, crops(bundle, tiny, ROLES[:1])), deadline=time.monotonic() + 60))
    host.step()  # the late run is answered (nobody waits for it) and skipped
    host.step()
    assert late.replies == [Failed("its deadline passed before it ran; dropped")]
    assert [len(verdicts) for verdicts in verdicts_in(on_time)] == [1]
    assert batch_total(batches, "_sum") == 1  # only the run on time was computed
