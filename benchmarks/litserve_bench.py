"""The service beside LitServe serving the same bundle, in one run, at several images per request.

For each ``--images-per-request`` k (default 1 and 8), two servers on 127.0.0.1 under the same
load (``serve_bench.py``'s HTTP/1.1 load generator: ``--clients`` connections posting multipart
JPEGs to ``POST /predict`` as fast as answers come back):

* ``service``   ``python -m service`` with ``--workers`` processes, ``max_batch_size=--max-batch-size``
                images and ``max_batch_delay_ms=--max-batch-delay-ms`` (measured exactly as
                ``serve_bench.py`` measures its ``batched`` runs), in each ``--service-layouts``:
                ``single`` (each worker runs the model in its own batch loop) and ``model-process``
                (the workers decode, one model process runs the model: like LitServe, HTTP and the
                model then live in different processes);
* ``litserve``  ``litserve_server.py``: LitServe on the CPU with ``workers_per_device=--workers``
                inference processes (and LitServe's default of as many API server processes), the
                service's per-image work (same decoder, crop and ``Bundle.predict``), batches of up
                to ``--max-batch-size // k`` requests, so at most as many images per forward pass as
                the service, after a ``batch_timeout`` of the same delay; with ``fast_queue=True``
                (its ZeroMQ transport; in short trials with 4 clients on the 2-core CPU its default
                ``multiprocessing.Manager`` queues served 6 img/s where ZeroMQ served 75;
                ``--manager-queue`` measures them).

Each run: start, a warm-up of ``2 x --clients`` requests, then ``--duration`` seconds measured.
Columns: requests and images answered with 200 per second, client-measured latency per request,
the mean batch the model ran (the service's ``/metrics``; LitServe's workers' batch log), and the
server's CPU time per image over all its processes (``/proc``). LitServe runs with the Python path
``--litserve-path`` prepended (where it was installed apart from the service's environment); when
it cannot be imported there, its rows are skipped with a note.

    PYTHONPATH=$PWD python benchmarks/litserve_bench.py --litserve-path <site> --workers 2 --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from load_generator import LoadGenerator, request_bodies
from machine import machine_name
from serve_bench import (
    DEFAULT_IMAGES, ROOT, RunResult, cpu_use, default_bundle, load_jpegs, measure_server, server_result,
)
from service.local import free_port, wait_until_ok


# The service's settings per layout: the model in every worker, or in one model process beside them.
SERVICE_LAYOUTS = {"single": {"model_process": "false"}, "model-process": {"model_process": "true"}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="<repository>/<name>/<version>; default: the embedded default")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder searched for *.jpg / *.jpeg")
    parser.add_argument("--max-images", type=int, default=512, help="how many JPEGs to load and cycle through")
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clients", type=int, default=16, help="concurrent client connections")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100_000, help="at most this many requests per run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per run")
    parser.add_argument("--workers", type=int, default=1, help="server processes holding the model, for both")
    parser.add_argument("--max-batch-size", type=int, default=32, help="images per forward pass, at most")
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument(
        "--service-layouts", nargs="+", choices=tuple(SERVICE_LAYOUTS), default=list(SERVICE_LAYOUTS),
        help="the service's process layouts measured, each beside the same LitServe run",
    )
    parser.add_argument("--litserve-path", type=Path, help="prepended to LitServe's PYTHONPATH (a pip --target)")
    parser.add_argument(
        "--manager-queue", dest="fast_queue", action="store_false",
        help="LitServe's default multiprocessing.Manager queues instead of its ZeroMQ ones (fast_queue=True)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "litserve_bench.json")
    args = parser.parse_args()
    if args.clients < args.client_processes or args.workers < 1 or not all(
        1 <= k <= args.max_batch_size for k in args.images_per_request
    ):
        parser.error("need --clients >= --client-processes, --workers >= 1, 1 <= --images-per-request <= --max-batch-size")
    # measure_server reads these serve_bench options too
    args.decode_workers, args.py_spy = None, None
    return args


def litserve_environment(site: Path | None) -> dict[str, str]:
    path = [str(site)] if site else []
    return os.environ | {"PYTHONPATH": os.pathsep.join([*path, str(ROOT)])}


def litserve_version(site: Path | None) -> str | None:
    """LitServe's version as its server process would import it; ``None`` when it cannot."""
    probe = subprocess.run(
        [sys.executable, "-c", "import litserve; print(litserve.__version__)"],
        env=litserve_environment(site), capture_output=True, text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def logged_batches(log: Path) -> tuple[int, int]:
    """``(images, batches)`` LitServe's workers have run so far (one line per batch)."""
    sizes = [int(line) for line in log.read_text().split()] if log.exists() else []
    return sum(sizes), len(sizes)


def measure_litserve(
    args: argparse.Namespace, bundle_path: Path, images_per_request: int, load: LoadGenerator
) -> RunResult:
    config = f"litserve-{images_per_request}img"
    log, batch_log = args.out.with_suffix(f".{config}.log"), args.out.with_suffix(f".{config}.batches")
    log.parent.mkdir(parents=True, exist_ok=True)
    batch_log.unlink(missing_ok=True)
    port = free_port()
    command = [
        sys.executable, str(ROOT / "benchmarks" / "litserve_server.py"), "--bundle", str(bundle_path),
        "--port", str(port), "--workers", str(args.workers),
        "--max-batch-size", str(litserve_batch_requests(args, images_per_request)),
        "--batch-timeout-ms", str(args.max_batch_delay_ms), "--batch-log", str(batch_log),
        *(["--fast-queue"] if args.fast_queue else []),
    ]
    with open(log, "wb") as sink:
        # its own process group: LitServe's API servers and inference workers stop with it
        process = subprocess.Popen(
            command, cwd=ROOT, env=litserve_environment(args.litserve_path), stdout=sink, stderr=sink,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/health", process, log, timeout_s=300)
        load.run(url, args.clients, 2 * args.clients, args.duration)  # warm-up, not measured
        images_before, batches_before = logged_batches(batch_log)
        cpu_before = cpu_use(process.pid)
        measured = load.run(url, args.clients, args.requests, args.duration)
        cpu_after = cpu_use(process.pid)
        images_after, batches_after = logged_batches(batch_log)
    finally:
        stop_group(process)
    return server_result(
        config, args.max_batch_size, measured, images_per_request,
        (images_after - images_before) / max(1, batches_after - batches_before), (cpu_before, cpu_after),
    )


def litserve_batch_requests(args: argparse.Namespace, images_per_request: int) -> int:
    """LitServe batches requests: as many as keep a batch within the service's image limit."""
    return max(1, args.max_batch_size // images_per_request)


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to it after ``timeout_s``."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_COLUMNS = ("config", "img/req", "req/s", "img/s", "p50 ms", "p99 ms", "mean batch", "cpu ms/img", "errors",
            "img/s vs litserve", "p99 vs litserve")


@dataclass(frozen=True)
class Comparison:
    """One request size: the service in each layout measured, and LitServe under the same load."""

    images_per_request: int
    services: dict[str, RunResult]  # by layout
    litserve: RunResult | None


def print_table(rows: list[Comparison]) -> None:
    """One line per server run; the service's with its ratios to LitServe at the same images per request."""
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = []
    for row in rows:
        litserve = row.litserve
        for result in [*row.services.values(), *([litserve] if litserve else [])]:
            ratios = (
                (result.images_per_s / litserve.images_per_s, (result.p99_ms or 0) / (litserve.p99_ms or 1))
                if litserve and result is not litserve else (None, None)
            )
            lines.append((
                result.config, str(row.images_per_request), number(result.images_per_s / row.images_per_request),
                number(result.images_per_s), number(result.p50_ms), number(result.p99_ms),
                number(result.mean_batch_size), number(result.cpu_ms_per_image, 2), str(result.errors),
                number(ratios[0], 2), number(ratios[1], 2),
            ))
    widths = [max(len(line[i]) for line in [_COLUMNS, *lines]) for i in range(len(_COLUMNS))]
    for line in [_COLUMNS, *lines]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def main() -> None:
    args = parse_args()
    bundle_path = (args.bundle or default_bundle()).resolve()
    jpegs = load_jpegs(args.images, args.max_images)
    version = litserve_version(args.litserve_path)
    if version is None:
        print(f"LitServe is not importable (PYTHONPATH {args.litserve_path or '-'}): its rows are skipped", flush=True)
    print(f"bundle {bundle_path} on cpu ({machine_name('cpu')}); {len(jpegs)} JPEGs; LitServe {version}", flush=True)
    rows: list[Comparison] = []
    for per_request in args.images_per_request:
        run_args = argparse.Namespace(**vars(args) | {"images_per_request": per_request})
        with LoadGenerator(request_bodies(jpegs, per_request), args.client_processes) as load:
            services = {}
            for layout in args.service_layouts:
                service = measure_server(
                    f"service-{layout}-{per_request}img", run_args, bundle_path, "cpu", args.max_batch_size,
                    args.max_batch_delay_ms, load, {"workers": str(args.workers), **SERVICE_LAYOUTS[layout]},
                )
                print(f"{service.config}: {service.images_per_s:.1f} img/s", flush=True)
                services[layout] = service
            litserve = measure_litserve(args, bundle_path, per_request, load) if version else None
            if litserve:
                print(f"{litserve.config}: {litserve.images_per_s:.1f} img/s", flush=True)
        rows.append(Comparison(per_request, services, litserve))
        write_report(args, bundle_path, version, rows)
    print_table(rows)
    print(f"wrote {args.out}")


def write_report(args: argparse.Namespace, bundle_path: Path, version: str | None, rows: list[Comparison]) -> None:
    report = {
        "bundle": str(bundle_path),
        "machine": machine_name("cpu"),
        "torch": torch.__version__,
        "clients": args.clients,
        "client_processes": args.client_processes,
        "duration_s": args.duration,
        "service": {"workers": args.workers, "max_batch_size_images": args.max_batch_size,
                    "max_batch_delay_ms": args.max_batch_delay_ms, "layouts": args.service_layouts},
        "litserve": None if version is None else {
            "version": version, "accelerator": "cpu", "devices": 1, "workers_per_device": args.workers,
            "num_api_servers": args.workers,  # LitServe's default: one per inference worker
            "max_batch_size_requests": {str(k): litserve_batch_requests(args, k) for k in args.images_per_request},
            "batch_timeout_s": args.max_batch_delay_ms / 1000, "fast_queue": args.fast_queue,
        },
        "results": [
            {
                "images_per_request": row.images_per_request,
                "service": {layout: asdict(result) for layout, result in row.services.items()},
                "litserve": asdict(row.litserve) if row.litserve else None,
            }
            for row in rows
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
