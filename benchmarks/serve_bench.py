"""Serving throughput and latency: the micro-batched server beside a naive one and the raw model.

Three measurements of one bundle on one machine, in one run (compare ratios, not absolute numbers):

* ``raw@M``    ``bundle.predict`` on preprocessed batches of ``--max-batch-size`` (M) images: the
               model's own rate, the ceiling the servers are compared with (no decoding, no HTTP);
               ``raw@1`` is the same at batch 1, the ceiling of a server that does not batch;
* ``batched``  ``python -m service`` on 127.0.0.1 with ``max_batch_size=--max-batch-size``, driven by
               ``--clients`` concurrent clients, each uploading real JPEGs to ``POST /predict``
               (``--images-per-request`` per request) as fast as answers come back;
               ``batched-Nw`` the same with ``MIXOE_WORKERS=N`` processes sharing the device, for
               each N > 1 in ``--workers``; ``batched-Nw-mp`` for each N in ``--model-process``,
               with ``MIXOE_MODEL_PROCESS=true``: one process holds the model and runs the
               batches of all N workers together (the mean batch is then the model process's);
               Each batched run measures its batch sizes at start (``MIXOE_BATCH_SIZE_TUNING``,
               ``service/runtime/batch_loop/tuning.py``); the ``limit`` column is the largest batch it then
               forms, from its log;
* ``...-Nt`` (``--model-threads N``) each ``batched`` and ``batched-Nw-mp`` run again with
               ``MIXOE_MODEL_THREADS=N``: the batch loop runs the model on N intra-op threads (on a CPU
               only: a CUDA batch loop runs on one);
* ``batched-untuned`` (``--untuned``) the ``batched`` run with ``MIXOE_BATCH_SIZE_TUNING=false``:
               batches of up to ``--max-batch-size`` whatever their speed;
* ``naive``    the same server with ``max_batch_size=1``: one forward pass per image, which is what a
               server without batching does; every server's rate is also given as a ratio to it;
* ``batched-nvjpeg`` (CUDA only) the run with the most ``--model-process`` workers (or, without
               any, the most ``--workers``) again with ``MIXOE_GPU_JPEG_DECODE=true``: JPEGs
               decoded and resized by nvjpeg on the GPU instead of on the CPU (by the workers).

Each server run is bounded by ``--requests`` and ``--duration`` (whichever ends first), after a
short unmeasured warm-up. Server throughput counts images answered with 200 per second; latency is
per request, measured by the client. The server's mean batch size comes from its ``/metrics``.
Where ``/proc`` exists (Linux) two more columns say what limits a server: its CPU time per image
(every process and thread of it) and how busy its busiest main thread was (a worker's event loop,
or the model process's inference loop; near 100% means that one thread is the bottleneck: more
``--workers`` help with an event loop). The
busiest load-generator process's CPU share says whether the client limited the run instead, and
on CUDA with NVML (nvidia-ml-py) a last column says how busy the GPU was.
The device defaults to ``auto`` (CUDA when present), so the same command runs on a GPU node; there,
use ``--client-processes`` so that the load generator is not the bottleneck.

    python benchmarks/serve_bench.py --bundle models/repository/flowers/1 --clients 32 --duration 20
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import Tensor

from load_generator import Load, LoadGenerator, request_bodies
from machine import machine_name
from models.contract.manifest import BundleError
from models.network.nets import resolve_device
from models.runtime import Bundle, load_bundle
from service.local import start_local_server
from service.runtime.decoding import decode_image
from service.runtime.registry import select_bundles
from service.settings import EMBEDDED_REPOSITORY

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "flowers17" / "images"
DECODE_LIMITS = {"max_bytes": 64 * 1024 * 1024, "max_pixels": 100_000_000}


@dataclass
class RunResult:
    """One configuration's numbers (``raw`` has no latencies)."""

    config: str
    max_batch_size: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_batch_size: float | None
    seconds: float
    cpu_ms_per_image: float | None = None
    busiest_loop_share: float | None = None
    busiest_client_share: float | None = None
    gpu_busy_share: float | None = None
    model_process_profile: list[tuple[str, float]] | None = None  # (function, share of samples), --py-spy
    batch_limit: int | None = None  # the largest batch the server forms, as its warm-up measured


class GpuBusy:
    """The share of time the GPU ran a kernel while the block ran (nvidia-smi's utilisation, read
    through NVML twice a second); ``share`` is ``None`` off CUDA or without NVML (nvidia-ml-py).

    On the H200 this told a GPU-bound server (4 workers, 56-83%) from a CPU-bound one (1 worker,
    4-7%) at the same rate, where ``nvidia-smi dmon`` had to be lined up with the logs by hand."""

    def __init__(self, device: str, interval_s: float = 0.5):
        self._device = torch.device(device)
        self._interval_s = interval_s
        self._samples: list[int] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        if self._device.type == "cuda":
            try:
                torch.cuda.utilization(self._device)
            except Exception as error:  # NVML missing or refused: the column stays empty
                print(f"note: no GPU utilisation ({type(error).__name__}: {error})")
            else:
                self._samples = []
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(self._interval_s):
            assert self._samples is not None
            self._samples.append(torch.cuda.utilization(self._device))

    @property
    def share(self) -> float | None:
        return statistics.fmean(self._samples) / 100 if self._samples else None


@dataclass(frozen=True)
class ProcessCpu:
    """CPU seconds one process has used so far: all its threads, and its main thread (a worker's event loop)."""

    total: float
    main_thread: float


class ModelProcessSampler:
    """Samples the model process with py-spy while the block runs; :meth:`profile` says where its
    time went: each function with the share of samples on which it was on the stack (its own time
    and its callees'), the largest first. Idle threads are not sampled, so the shares are of the
    time the process's threads were busy. Does nothing without a py-spy binary."""

    def __init__(self, py_spy: Path | None, server_log: Path, seconds: float, top: int = 25):
        self._py_spy = py_spy
        self._log = server_log
        self._seconds = max(1, int(seconds))
        self._top = top
        self._samples = server_log.with_suffix(".model_process.txt")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ModelProcessSampler:
        pid = self._model_process_pid()
        if self._py_spy is not None and pid is not None:
            command = [str(self._py_spy), "record", "--nonblocking", "--rate", "200", "--duration", str(self._seconds),
                       "--format", "raw", "--output", str(self._samples), "--pid", str(pid)]
            self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout=self._seconds + 30)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def profile(self) -> list[tuple[str, float]] | None:
        if self._process is None or not self._samples.exists():
            return None
        on_stack: dict[str, int] = {}
        total = 0
        for line in self._samples.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            total += int(count)
            for function in {_function(frame) for frame in stack.split(";")[1:]}:  # the first is the thread
                on_stack[function] = on_stack.get(function, 0) + int(count)
        ranked = sorted(on_stack.items(), key=lambda item: -item[1])[: self._top]
        return [(function, samples / total) for function, samples in ranked] if total else None

    def _model_process_pid(self) -> int | None:
        """From the model process's own "listening" log line (JSON, with its pid)."""
        for line in self._log.read_text(errors="replace").splitlines():
            if "model process listening" in line:
                return int(json.loads(line)["pid"])
        return None


def _function(frame: str) -> str:
    """``ModelHost.step (service/runtime/batch_loop/model_host.py:151)`` -> ``ModelHost.step (model_host.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name


def cpu_use(pid: int) -> dict[int, ProcessCpu] | None:
    """The CPU use of process ``pid`` and each of its descendants; ``None`` without Linux's ``/proc``
    (or its list of children, which some kernels lack)."""
    if not Path(f"/proc/{pid}/task/{pid}/children").exists():
        return None
    use = {}
    for process in [pid, *_descendants(pid)]:
        try:
            use[process] = ProcessCpu(
                _cpu_seconds(Path(f"/proc/{process}/stat")), _cpu_seconds(Path(f"/proc/{process}/task/{process}/stat"))
            )
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
    return use


def cpu_columns(
    before: dict[int, ProcessCpu] | None, after: dict[int, ProcessCpu] | None, images: int, seconds: float
) -> tuple[float | None, float | None]:
    """(server CPU ms per image, the busiest event loop's share of the run), over the processes that
    lived through the whole run; ``(None, None)`` when that cannot be known."""
    if before is None or after is None or not images:
        return None, None
    lived = before.keys() & after.keys()
    if lived != before.keys() | after.keys():
        print("note: server processes came or went during the run; CPU counts those that lived through it")
    total = sum(after[pid].total - before[pid].total for pid in lived)
    busiest = max(after[pid].main_thread - before[pid].main_thread for pid in lived)
    return 1000 * total / images, busiest / seconds


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return [grandchild for child in children for grandchild in [child, *_descendants(child)]]


def _cpu_seconds(stat: Path) -> float:
    """User + system time from a ``/proc`` stat file (fields 14 and 15; the name may hold spaces)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, help="<repository>/<name>/<version>; default: the embedded default model"
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder searched for *.jpg / *.jpeg")
    parser.add_argument("--max-images", type=int, default=512, help="how many JPEGs to load and cycle through")
    parser.add_argument("--clients", type=int, default=32, help="concurrent client connections")
    parser.add_argument("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--requests", type=int, default=3000, help="at most this many requests per server run")
    parser.add_argument("--duration", type=float, default=30.0, help="at most this many seconds per server run")
    parser.add_argument("--raw-seconds", type=float, default=10.0, help="how long to time the raw model")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--decode-workers", type=int, help="the server's decoding threads; default: the service's own")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="server processes: one batched run per count given"
    )
    parser.add_argument(
        "--model-process", type=int, nargs="*", default=[], metavar="WORKERS",
        help="worker counts to run (again) with MIXOE_MODEL_PROCESS=true: one process holds the model for all",
    )
    parser.add_argument(
        "--model-threads", type=int, nargs="*", default=[], metavar="THREADS",
        help="on a CPU, repeat each batched and model-process run with MIXOE_MODEL_THREADS=THREADS (config suffix -Nt)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="only raw and batched")
    parser.add_argument(
        "--untuned", action="store_true",
        help="also run the batched server with MIXOE_BATCH_SIZE_TUNING=false (batches up to --max-batch-size)",
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="PATH",
        help="a py-spy binary: sample the model process during each measured model-process run and report "
        "where its time went (the functions on the most samples)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "serve_bench.json")
    args = parser.parse_args()
    if (
        args.clients < args.client_processes
        or args.max_batch_size < 1
        or not 1 <= args.images_per_request <= 1000
        or not all(1 <= workers <= 64 for workers in [*args.workers, *args.model_process])
        or not all(threads >= 1 for threads in args.model_threads)
    ):
        parser.error(
            "need --clients >= --client-processes, --max-batch-size >= 1, 1 <= --images-per-request <= 1000 "
            "(the service's max_files limit), 1 <= --workers <= 64 and --model-threads >= 1"
        )
    return args


def default_bundle() -> Path:
    try:
        _, _, path = select_bundles(EMBEDDED_REPOSITORY, [])[0]
    except BundleError as error:  # no repository or no bundles yet
        raise SystemExit(f"no default bundle ({error}); pass --bundle <repository>/<name>/<version>") from None
    return path


def load_jpegs(folder: Path, limit: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not files:
        raise SystemExit(f"no JPEG files under {folder}")
    return [(path.name, path.read_bytes()) for path in files]


@dataclass(frozen=True)
class RawRates:
    """The model's own rates: eager at each batch size (largest first), and replayed from a CUDA
    graph at the largest, with how far the graph's logits are from the eager pass's."""

    eager: list[RunResult]
    graphs: RunResult | None
    graph_logit_difference: float | None
    decode_ms: float


def measure_raw(
    bundle_path: Path, jpegs: list[tuple[str, bytes]], batch_sizes: list[int], device: str, seconds: float
) -> RawRates:
    """The model's own rate on real preprocessed images, per batch size; and decode+preprocess ms per image.

    Eager: ``bundle.predict`` on normalised float batches in CPU memory, the reference all along.
    On CUDA also the fastest the model goes: uint8 crops already on the GPU, the forward pass
    replayed from a CUDA graph, as the service runs it."""
    bundle = load_bundle(bundle_path, device)
    started = time.perf_counter()
    images = [decode_image(data, **DECODE_LIMITS) for _, data in jpegs[: max(max(batch_sizes), min(len(jpegs), 200))]]
    tensors = [bundle.preprocess([image]) for image in images]
    decode_ms = 1000 * (time.perf_counter() - started) / len(images)
    eager = []
    for batch_size in batch_sizes:
        batch = torch.cat([tensors[i % len(tensors)] for i in range(batch_size)])
        eager.append(time_predict(f"raw@{batch_size}", bundle, batch, seconds))
    graphs, difference = None, None
    if bundle.device.type == "cuda":
        size = batch_sizes[0]
        pixels = torch.stack([bundle.pixels(images[i % len(images)]) for i in range(size)]).to(bundle.device)
        eager_logits = bundle.predict(pixels).logits
        bundle.capture_graph(size)
        difference = (bundle.predict(pixels).logits - eager_logits).abs().max().item()
        graphs = time_predict(f"raw@{size}-graphs", bundle, pixels, seconds)
    del bundle, tensors
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return RawRates(eager, graphs, difference, decode_ms)


def time_predict(config: str, bundle: Bundle, batch: Tensor, seconds: float) -> RunResult:
    for _ in range(3):
        bundle.predict(batch)  # warm-up: lazy init, cuDNN algorithm choice
    batches, started = 0, time.perf_counter()
    while batches < 3 or time.perf_counter() - started < seconds:
        bundle.predict(batch)  # returns CPU tensors: includes the device sync and copy back
        batches += 1
    elapsed = time.perf_counter() - started
    rows = len(batch)
    return RunResult(config, rows, batches, 0, batches * rows / elapsed, None, None, None, float(rows), elapsed)


def batch_totals(url: str, histogram: str) -> tuple[float, float]:
    """``(images batched, batches run)`` so far, from the server's batch-size ``histogram``."""
    values = {f"{histogram}_sum": 0.0, f"{histogram}_count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values[f"{histogram}_sum"], values[f"{histogram}_count"]


def percentile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile (1..99) of ``values`` in seconds, as milliseconds; ``None`` when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return 1000 * values[0]
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure_server(
    config: str,
    args: argparse.Namespace,
    bundle_path: Path,
    device: str,
    max_batch_size: int,
    delay_ms: float,
    load: LoadGenerator,
    extra_settings: dict[str, str] | None = None,
) -> RunResult:
    settings = (extra_settings or {}) | {
        "model_repository": str(bundle_path.parent.parent),
        "models": f"{bundle_path.parent.name}:{bundle_path.name}",
        "device": device,
        "max_batch_size": str(max_batch_size),
        "max_batch_delay_ms": str(delay_ms),
        "queue_size": str(max(1024, 2 * args.clients * args.images_per_request)),
        "max_files": str(max(64, args.images_per_request)),
    }
    if args.decode_workers:
        settings["decode_workers"] = str(args.decode_workers)
    merged = settings.get("model_process") == "true"
    histogram = "mixoe_batch_size"  # the batches the device runs, in the model process or a worker
    server = start_local_server(settings, args.out.with_suffix(f".{config}.log"), timeout_s=300)
    url = server.url
    try:
        load.run(url, args.clients, 2 * args.clients, args.duration)  # warm-up, not measured
        images_before, batches_before = batch_totals(url, histogram)
        cpu_before = cpu_use(server.process.pid)
        sampler = ModelProcessSampler(args.py_spy, server.log, args.duration) if merged else None
        with GpuBusy(device) as gpu, sampler or contextlib.nullcontext():
            measured = load.run(url, args.clients, args.requests, args.duration)
        cpu_after = cpu_use(server.process.pid)
        images_after, batches_after = batch_totals(url, histogram)
    finally:
        server.stop(timeout_s=60)
    return server_result(
        config, max_batch_size, measured, args.images_per_request,
        (images_after - images_before) / max(1.0, batches_after - batches_before), (cpu_before, cpu_after),
        gpu_busy_share=gpu.share,
        model_process_profile=sampler.profile() if sampler else None,
        batch_limit=logged_batch_limit(server.log),
    )


def server_result(
    config: str,
    max_batch_size: int,
    measured: Load,
    images_per_request: int,
    mean_batch_size: float,
    cpu: tuple[dict[int, ProcessCpu] | None, dict[int, ProcessCpu] | None],
    **extra: Any,
) -> RunResult:
    """A server run's row from what the clients saw and the server's CPU use before and after."""
    images = len(measured.latencies) * images_per_request
    cpu_ms_per_image, busiest_loop_share = cpu_columns(*cpu, images, measured.seconds)
    return RunResult(
        config=config,
        max_batch_size=max_batch_size,
        requests=len(measured.latencies) + measured.errors,
        errors=measured.errors,
        images_per_s=images / measured.seconds,
        p50_ms=percentile(measured.latencies, 50),
        p95_ms=percentile(measured.latencies, 95),
        p99_ms=percentile(measured.latencies, 99),
        mean_batch_size=mean_batch_size,
        seconds=measured.seconds,
        cpu_ms_per_image=cpu_ms_per_image,
        busiest_loop_share=busiest_loop_share,
        busiest_client_share=measured.busiest_client_share,
        **extra,
    )


def logged_batch_limit(log: Path) -> int | None:
    """The batch size limit the server's warm-up chose (its JSON log line); ``None`` when it timed nothing."""
    for line in log.read_text(errors="replace").splitlines():
        if '"batch_size_limit"' in line:
            return int(json.loads(line)["batch_size_limit"])
    return None


_COLUMNS = (
    "config", "batch", "limit", "requests", "errors", "img/s", "p50 ms", "p95 ms", "p99 ms", "mean batch",
    "cpu ms/img", "loop busy", "client busy", "gpu busy", "vs raw", "vs graphs", "vs naive",
)


def print_table(results: list[RunResult], references: Baselines) -> None:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        (
            r.config,
            str(r.max_batch_size),
            "-" if r.batch_limit is None else str(r.batch_limit),
            str(r.requests),
            str(r.errors),
            f"{r.images_per_s:.1f}",
            number(r.p50_ms),
            number(r.p95_ms),
            number(r.p99_ms),
            number(r.mean_batch_size),
            "-" if r.cpu_ms_per_image is None else f"{r.cpu_ms_per_image:.2f}",
            "-" if r.busiest_loop_share is None else f"{100 * r.busiest_loop_share:.0f}%",
            "-" if r.busiest_client_share is None else f"{100 * r.busiest_client_share:.0f}%",
            "-" if r.gpu_busy_share is None else f"{100 * r.gpu_busy_share:.0f}%",
            *(number(ratio, 2) for ratio in references.ratios(r).values()),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        print(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )


def server_runs(args: argparse.Namespace, device: str) -> list[tuple[str, int, float, dict[str, str]]]:
    """The server runs asked for, in order: ``(config, max batch size, max delay ms, settings)``."""
    batched = (args.max_batch_size, args.max_batch_delay_ms)
    # Explicit either way: the service's own default (auto) would give several workers on a GPU a
    # model process, and "batched-Nw" is the run without one.
    runs = [
        ("batched" if n == 1 else f"batched-{n}w", *batched, {"workers": str(n), "model_process": "false"})
        for n in sorted(set(args.workers))
    ]
    runs += [
        (f"batched-{n}w-mp", *batched, {"workers": str(n), "model_process": "true"})
        for n in sorted(set(args.model_process))
    ]
    if device.startswith("cuda"):
        # The nvjpeg twin of the run with the most workers: with a model process if any ran
        # (where the choice is nvjpeg in one process or the CPUs of all workers).
        most = max(args.model_process or args.workers)
        name = "batched-nvjpeg" + (f"-{most}w" if most > 1 else "") + ("-mp" if args.model_process else "")
        with_model_process = str(bool(args.model_process)).lower()
        settings = {"workers": str(most), "gpu_jpeg_decode": "true", "model_process": with_model_process}
        runs.append((name, *batched, settings))
    else:  # --model-threads: a CUDA batch loop runs on one thread whatever the setting
        runs += [
            (f"{config}-{threads}t", *sizes, settings | {"model_threads": str(threads)})
            for threads in sorted(set(args.model_threads))
            for config, *sizes, settings in list(runs)
        ]
    if args.untuned:
        runs.append(("batched-untuned", *batched, {"model_process": "false", "batch_size_tuning": "false"}))
    if not args.skip_naive:
        runs.append(("naive", 1, 0.0, {"model_process": "false", "batch_size_tuning": "false"}))
    return runs


@dataclass(frozen=True)
class Baselines:
    """The rates a server is compared with: eager ``raw@M`` (the reference), on CUDA
    ``raw@M-graphs``, the fastest the model goes, and the naive server once it has run."""

    eager: float
    graphs: float | None
    naive: float | None = None

    def ratios(self, result: RunResult) -> dict[str, float | None]:
        return {
            "vs_raw": result.images_per_s / self.eager,
            "vs_raw_graphs": result.images_per_s / self.graphs if self.graphs else None,
            "vs_naive": result.images_per_s / self.naive if self.naive else None,
        }

    def describe(self, result: RunResult) -> str:
        ratios = self.ratios(result)
        graphs = "" if ratios["vs_raw_graphs"] is None else f", {ratios['vs_raw_graphs']:.2f} x raw-graphs"
        return f"{ratios['vs_raw']:.2f} x raw{graphs}"


def write_report(
    args: argparse.Namespace,
    bundle_path: Path,
    device: str,
    jpegs: int,
    raw: RawRates,
    references: Baselines,
    results: list[RunResult],
) -> None:
    """The JSON report: every result with its ratios to the raw rates."""
    report = {
        "bundle": str(bundle_path),
        "device": device,
        "machine": machine_name(device),
        "torch": torch.__version__,
        "images": str(args.images),
        "jpegs": jpegs,
        "clients": args.clients,
        "client_processes": args.client_processes,
        "images_per_request": args.images_per_request,
        "workers": args.workers,
        "model_process": args.model_process,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "decode_preprocess_ms_per_image": raw.decode_ms,
        "graph_vs_eager_max_logit_difference": raw.graph_logit_difference,
        "results": [asdict(r) | references.ratios(r) for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    bundle_path = (args.bundle or default_bundle()).resolve()
    device = str(resolve_device(args.device))
    jpegs = load_jpegs(args.images, args.max_images)
    print(
        f"bundle {bundle_path} on {device} ({machine_name(device)}); {len(jpegs)} JPEGs from {args.images}", flush=True
    )

    raw = measure_raw(bundle_path, jpegs, sorted({args.max_batch_size, 1}, reverse=True), device, args.raw_seconds)
    references = Baselines(raw.eager[0].images_per_s, raw.graphs.images_per_s if raw.graphs else None)
    results = raw.eager + ([raw.graphs] if raw.graphs else [])
    for result in results:
        print(f"{result.config}: {result.images_per_s:.1f} img/s", flush=True)
    if raw.graph_logit_difference is not None:
        print(f"CUDA graph vs eager logits: largest difference {raw.graph_logit_difference:.3g}", flush=True)
    print(f"PIL decode+preprocess: {raw.decode_ms:.2f} ms/img (1 thread; decode_bench.py times the service's)",
          flush=True)
    # Each run's line, and the JSON so far, as soon as it ends: a benchmark cut short by a device
    # session's time limit still leaves the runs it finished.
    with LoadGenerator(request_bodies(jpegs, args.images_per_request), args.client_processes) as load:
        for config, max_batch_size, delay_ms, settings in server_runs(args, device):
            result = measure_server(config, args, bundle_path, device, max_batch_size, delay_ms, load, settings)
            results.append(result)
            print(f"{config}: {result.images_per_s:.1f} img/s ({references.describe(result)})", flush=True)
            for function, share in result.model_process_profile or []:
                print(f"    {100 * share:5.1f}%  {function}", flush=True)
            write_report(args, bundle_path, device, len(jpegs), raw, references, results)
    naive = next((r.images_per_s for r in results if r.config == "naive"), None)
    references = replace(references, naive=naive)
    write_report(args, bundle_path, device, len(jpegs), raw, references, results)
    print_table(results, references)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
