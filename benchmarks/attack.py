"""The overload and slow-client attack on ``python -m service``, as a repeatable benchmark (loopback only).

Overload: closed-loop clients post one small JPEG each to ``POST /predict``, back to back, and
retry at once after a 503 (ignoring ``Retry-After``, as an attacker or a careless client does).
A ramp over ``--ramp`` client counts finds the peak goodput and the saturating load: the fewest
clients reaching 90% of the peak, but at least the admission capacity (``queue_size +
max_batch_size`` single-image requests), since fewer closed-loop clients than that are never
refused; then 1x, 2x and 10x that load run for ``--seconds`` each.
Per run: goodput (requests answered 200 per second), refusals (503s, from the server's
``mixoe_requests_total``), p99 of the admitted requests, and what a refusal costs:

* ``cpu/503``: the server's CPU time over the run (every thread, from ``/proc``), less its 200s at
  the CPU per 200 of the 1x run, divided by the 503s: an estimate, high when fuller batches made
  the 200s cheaper under overload;
* ``app/503``: the median time a 503 spent in the app (the access log's ``duration_s``; wall time,
  without uvicorn's parsing).

The stated bound for admitted requests: one waits behind at most ``queue_size + max_batch_size``
images of its worker, so its latency stays near that many images' time at the rate the server
achieves (``bound ms``: capacity / the run's goodput; by Little's law the mean of closed-loop
clients that fill the capacity is that). ``load`` is the machine's 1-minute load average at the
run's end: on a shared machine other work takes cores from the server.

Slowloris: ``--slow`` connections of each kind (silent; trickling header lines; full headers and a
trickled body) held for ``--header-timeout-s`` + 5 s, counting how many the server closed and its
open file descriptors, while a normal request is timed on another connection.

The server, the load generator (one process, asyncio) and the slow clients share the machine:
on a 2-core CPU they compete for it, and the numbers say so only for that machine.

    python benchmarks/attack.py --images ../shared/data/flowers17/images
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image

from load_generator import Load, LoadGenerator, request_bodies
from machine import machine_name
from serve_bench import DEFAULT_IMAGES, ROOT, cpu_use, default_bundle, load_jpegs, percentile
from service.local import LocalServer, log_entries, start_local_server

OUT = ROOT / "benchmarks" / "results" / "attack_cpu.json"
ROUTE = "/predict"


@dataclass
class OverloadRun:
    name: str
    clients: int
    seconds: float
    ok: int
    refused: int
    other_errors: int
    goodput_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_s: float
    cpu_ms_per_ok: float | None
    cpu_ms_per_refusal: float | None = None
    app_ms_per_refusal: float | None = None
    client_cpu_share: float = 0.0
    bound_ms: float | None = None
    load_average: float = 0.0


@dataclass
class SlowlorisCheck:
    per_kind: int
    header_timeout_s: float
    body_timeout_s: float
    open_before: int
    closed_by_server: dict[str, int]
    held_s: float
    fds_before: int
    fds_during: int
    fds_after: int
    normal_request_ms: float
    normal_request_status: int
    normal_request_after_status: int


def small_jpegs(jpegs: list[tuple[str, bytes]], side: int) -> list[tuple[str, bytes]]:
    """Each JPEG scaled down to ``side`` pixels on its shorter side: uploads that cost little to send."""
    small = []
    for name, data in jpegs:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        scale = side / min(image.size)
        buffer = io.BytesIO()
        image.resize((round(image.width * scale), round(image.height * scale))).save(buffer, "JPEG", quality=90)
        small.append((name, buffer.getvalue()))
    return small


def refusals(url: str) -> float:
    """503s answered on ``ROUTE`` so far (the server's own count)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("mixoe_requests_total{") and f'route="{ROUTE}"' in line and 'status="503"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def server_cpu_s(pid: int) -> float:
    use = cpu_use(pid)
    if use is None:
        raise SystemExit("attack.py needs Linux's /proc to measure the server's CPU time")
    return sum(process.total for process in use.values())


def overload_run(name: str, server: LocalServer, load: LoadGenerator, clients: int, seconds: float) -> OverloadRun:
    log_start = len(log_entries(server.log))
    refused_before, cpu_before = refusals(server.url), server_cpu_s(server.process.pid)
    result: Load = load.run(server.url, clients, 10**9, seconds)
    cpu = server_cpu_s(server.process.pid) - cpu_before
    refused = round(refusals(server.url) - refused_before)
    ok = len(result.latencies)
    app_times = [
        entry["duration_s"]
        for entry in log_entries(server.log)[log_start:]
        if entry.get("route") == ROUTE and entry.get("status") == 503
    ]
    return OverloadRun(
        name=name,
        clients=clients,
        seconds=result.seconds,
        ok=ok,
        refused=refused,
        other_errors=result.errors - refused,
        goodput_per_s=ok / result.seconds,
        p50_ms=percentile(result.latencies, 50),
        p99_ms=percentile(result.latencies, 99),
        server_cpu_s=cpu,
        cpu_ms_per_ok=1000 * cpu / ok if ok else None,
        app_ms_per_refusal=1000 * statistics.median(app_times) if app_times else None,
        client_cpu_share=result.busiest_client_share,
        load_average=os.getloadavg()[0],
    )


async def slowloris(server: LocalServer, per_kind: int, header_timeout_s: float, body_timeout_s: float,
                    normal_body: bytes) -> SlowlorisCheck:
    """Hold ``per_kind`` connections of each kind for the longer deadline + 5 s; count what the server closed."""
    port = int(server.url.rsplit(":", 1)[1])
    pid = server.process.pid
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    kinds = {
        "silent": (b"", b""),
        "slow headers": (head, b"X-Pad: 1\r\n"),
        "slow body": (head + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
                      b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n', b"x"),
    }
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    held_s = max(header_timeout_s, body_timeout_s) + 5
    closed = {kind: 0 for kind in kinds}
    fds_during = 0

    async def hold(kind: str, first: bytes, trickle: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        ends = time.monotonic() + held_s
        try:
            while time.monotonic() < ends:
                try:
                    async with asyncio.timeout(1.0):
                        if not await reader.read(65536) and reader.at_eof():
                            closed[kind] += 1
                            return
                except TimeoutError:
                    pass
                if trickle:
                    writer.write(trickle)
        except ConnectionError:
            closed[kind] += 1
        finally:
            writer.close()

    async def observe() -> tuple[int, float, int]:
        await asyncio.sleep(1.0)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(
                f"{server.url}/predict", content=normal_body,
                headers={"Content-Type": "multipart/form-data; boundary=mixoe-serve-bench"},
            )
        return fds, 1000 * (time.perf_counter() - started), response.status_code

    tasks = [hold(kind, *kinds[kind]) for kind in kinds for _ in range(per_kind)]
    *_, (fds_during, normal_ms, normal_status) = await asyncio.gather(*tasks, observe())
    await asyncio.sleep(0.5)
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    *_, after_status = await observe()
    return SlowlorisCheck(
        per_kind, header_timeout_s, body_timeout_s, per_kind * len(kinds), closed, held_s,
        fds_before, fds_during, fds_after, normal_ms, normal_status, after_status,
    )


def print_table(runs: list[OverloadRun], peak: float, check: SlowlorisCheck | None) -> None:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"\npeak goodput {peak:.1f}/s")
    print("| run | clients | goodput /s | of peak | 503s | p50 ms | p99 ms | bound ms | server CPU ms per 200 "
          "| cpu/503 ms (est.) | app/503 ms | client CPU | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run.name} | {run.clients} | {run.goodput_per_s:.1f} | {run.goodput_per_s / peak:.0%} | {run.refused} "
            f"| {number(run.p50_ms, 0)} | {number(run.p99_ms, 0)} | {number(run.bound_ms, 0)} "
            f"| {number(run.cpu_ms_per_ok)} | {number(run.cpu_ms_per_refusal, 2)} | {number(run.app_ms_per_refusal, 2)} "
            f"| {run.client_cpu_share:.0%} | {run.load_average:.1f} |"
        )
    if any(run.other_errors for run in runs):
        print(f"other errors (neither 200 nor 503): {[(run.name, run.other_errors) for run in runs]}")
    if check is None:
        return
    print(
        f"\nslowloris: {check.open_before} connections ({check.per_kind} silent, slow-header, slow-body), header/body "
        f"deadlines {check.header_timeout_s:g}/{check.body_timeout_s:g} s; closed by the server within "
        f"{check.held_s:g} s: {check.closed_by_server}; server fds {check.fds_before} -> {check.fds_during} (1 s in) -> "
        f"{check.fds_after} (after); a normal request 1 s in: {check.normal_request_status} in "
        f"{check.normal_request_ms:.0f} ms, after: {check.normal_request_after_status}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the embedded repository's first bundle")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="a folder of JPEGs (scaled down)")
    parser.add_argument("--image-side", type=int, default=160, help="shorter side of the uploaded JPEGs")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--ramp", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ramp-seconds", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each 1x/2x/10x run")
    parser.add_argument(
        "--slow", type=int, default=50,
        help="slowloris connections of each kind; 0: no slowloris check, and the server's own deadlines",
    )
    parser.add_argument("--header-timeout-s", type=float, default=3.0)
    parser.add_argument("--body-timeout-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not (0 <= args.slow <= 200 and args.seconds <= 60 and args.ramp_seconds <= 60 and max(args.ramp) <= 64):
        parser.error("bounded on purpose: --slow 0..200, --seconds and --ramp-seconds <= 60, --ramp clients <= 64")
    return args


def main() -> None:
    args = parse_args()
    bundle = (args.bundle or default_bundle()).resolve()
    jpegs = small_jpegs(load_jpegs(args.images, 64), args.image_side)
    bodies = request_bodies(jpegs, 1)
    settings = {
        "model_repository": str(bundle.parents[1]),
        "models": f"{bundle.parent.name}:{bundle.name}",
        "device": "cpu",
        "queue_size": str(args.queue_size),
        "max_batch_size": str(args.max_batch_size),
        "max_files": str(min(args.queue_size, 64)),
    }
    if args.slow:
        settings |= {"header_timeout_s": str(args.header_timeout_s), "body_timeout_s": str(args.body_timeout_s)}
    log = Path(tempfile.mkdtemp(prefix="mixoe-attack-")) / "server.log"
    print(f"{bundle} on {machine_name('cpu')}; settings {settings}", flush=True)
    server = start_local_server(settings, log)
    try:
        with LoadGenerator(bodies, processes=1) as load:
            load.run(server.url, 2, 20, 10.0)  # warm-up, unmeasured
            ramp = [overload_run(f"ramp {c}", server, load, c, args.ramp_seconds) for c in args.ramp]
            for run in ramp:
                print(f"{run.name}: {run.goodput_per_s:.1f}/s, {run.refused} refused", flush=True)
            peak = max(run.goodput_per_s for run in ramp)
            capacity = args.queue_size + args.max_batch_size
            saturating = max(capacity, min(run.clients for run in ramp if run.goodput_per_s >= 0.9 * peak))
            runs = [overload_run(f"{m}x", server, load, m * saturating, args.seconds) for m in (1, 2, 10)]
        cpu_per_ok = runs[0].cpu_ms_per_ok or 0.0
        for run in ramp + runs:
            run.bound_ms = 1000 * capacity / run.goodput_per_s if run.goodput_per_s else None
        for run in runs:
            if run.refused:
                run.cpu_ms_per_refusal = (1000 * run.server_cpu_s - run.ok * cpu_per_ok) / run.refused
            print(f"{run.name}: {run.goodput_per_s:.1f}/s, {run.refused} refused", flush=True)
        check = None
        if args.slow:
            check = asyncio.run(slowloris(server, args.slow, args.header_timeout_s, args.body_timeout_s, bodies[0]))
    finally:
        server.stop()
    print_table(ramp + runs, peak, check)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name("cpu"),
        "bundle": str(bundle.relative_to(ROOT)) if bundle.is_relative_to(ROOT) else str(bundle),
        "settings": settings,
        "image_side": args.image_side,
        "command": "python benchmarks/attack.py " + " ".join(sys.argv[1:]),
        "peak_goodput_per_s": peak,
        "runs": [asdict(run) for run in ramp + runs],
        "slowloris": asdict(check) if check else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; the server's log is {log}")


if __name__ == "__main__":
    main()
