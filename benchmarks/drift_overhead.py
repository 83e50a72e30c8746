"""What the drift alarm costs the event loop per request (``service.monitoring.drift``).

``DriftAlarms.observe`` runs on the worker's event loop after a request's verdicts and counts, at
the end of that turn of the loop, every score answered in it; run here outside a loop it counts at
once, one update per request, which is what this times: for a
request of ``B`` images it ranks ``B`` OOD scores against the bag (``OnlineConformal.p_values``),
takes ``B`` Jumper steps (``PowerJumper.update_many``), checks the shared reset marker and sets
two gauges. This times each of those alone and ``observe`` as a whole, with a shared metrics
directory (several workers: the marker is checked) and without, on the default bundle's
calibration scores (``flowers17/1``, the default when these were measured). Each row is the best of ``--repeat`` rounds (on a shared machine, the round
least disturbed by other work), in microseconds per request.

For reference: a reset (the admin route), and the event loop's CPU time to hand one no-op to a
worker thread and take its answer back (``run_in_executor``): what moving ``observe`` off the loop
would cost the loop in its place.

Run it on two trees and compare (``--baseline``: the JSON of the other run; adds a ratio column)::

    PYTHONPATH=<old tree> python benchmarks/drift_overhead.py --output /tmp/drift_overhead_before.json
    PYTHONPATH=$PWD python benchmarks/drift_overhead.py --baseline /tmp/drift_overhead_before.json \\
        --output benchmarks/results/drift_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from machine import machine_name

from models.calibration.drift import PowerJumper
from models.calibration.online_conformal import OnlineConformal
from models.contract.manifest import Manifest
from service.monitoring.drift import DriftAlarms
from service.monitoring.metrics import ServiceMetrics, score_buckets

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT / "models/repository/flowers17/1/manifest.json"


def best_microseconds(call: Callable[[], object], number: int, repeat: int) -> float:
    """The fastest of ``repeat`` rounds of ``number`` calls, per call."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def handoff_loop_microseconds(rounds: int) -> float:
    """Event-loop CPU time (``time.thread_time``: the loop's thread only) per no-op sent to a thread."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            await loop.run_in_executor(pool, int)  # start the thread outside the timing
            start = time.thread_time()
            for _ in range(rounds):
                await loop.run_in_executor(pool, int)
            return (time.thread_time() - start) / rounds * 1e6

    return asyncio.run(main())


def measure(manifest: Manifest, batch: int, number: int, repeat: int, shared: Path) -> dict[str, float]:
    """Microseconds per request of ``batch`` images, per part and in all."""
    scores = list(np.random.default_rng(batch).choice(manifest.calibration.scores, batch))
    uniforms = 1.0 - np.random.default_rng(0).random(batch)
    bag = OnlineConformal(manifest.calibration.scores)
    p_values = bag.p_values(scores, uniforms)
    martingale = PowerJumper()
    metrics = ServiceMetrics(score_buckets([manifest]), 32)
    alone = DriftAlarms([manifest], metrics, delta=0.01, workers=1)
    workers = DriftAlarms([manifest], metrics, delta=0.01, workers=2, shared_directory=shared)
    workers.reset(manifest.name, manifest.version)  # a marker in place, as after any reset
    rows = {
        "p-values (OnlineConformal.p_values)": lambda: bag.p_values(scores, uniforms),
        "Jumper steps (PowerJumper.update_many)": lambda: martingale.update_many(p_values),
        "gauges (ServiceMetrics.record_drift)": lambda: metrics.record_drift(
            manifest.name, manifest.version, 0.0, False
        ),
        "observe, one worker": lambda: alone.observe(manifest.name, manifest.version, scores),
        "observe, shared directory (reset marker checked)": lambda: workers.observe(
            manifest.name, manifest.version, scores
        ),
    }
    return {name: best_microseconds(call, number, repeat) for name, call in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="images per request")
    parser.add_argument("--number", type=int, default=500, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best is kept")
    parser.add_argument("--baseline", type=Path, help="JSON of an earlier run: adds its times and the ratio")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    manifest = Manifest.model_validate_json(args.manifest.read_text())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as shared:
        results = {
            str(b): measure(manifest, b, max(1, args.number // b), args.repeat, Path(shared)) for b in args.batches
        }
        metrics = ServiceMetrics(score_buckets([manifest]), 32)
        resetter = DriftAlarms([manifest], metrics, delta=0.01, workers=2, shared_directory=Path(shared))
        reset = best_microseconds(lambda: resetter.reset(manifest.name, manifest.version), 20, args.repeat)
    results["reference"] = {
        "reset, shared directory (admin route)": reset,
        "hand-off to a thread and back (loop CPU)": handoff_loop_microseconds(args.number * 4),
    }
    baseline = json.loads(args.baseline.read_text())["microseconds_per_request"] if args.baseline else {}

    header = f"{'images':>6}  {'part':<50} {'µs/request':>10} {'µs/image':>9}"
    print(header + ("  baseline   ratio" if baseline else ""))
    for batch, parts in results.items():
        images = int(batch) if batch.isdigit() else 1
        for name, micros in parts.items():
            line = f"{batch:>6}  {name:<50} {micros:>10.1f} {micros / images:>9.1f}"
            old = baseline.get(batch, {}).get(name)
            if old is not None:
                line += f"  {old:>8.1f}  {micros / old:>6.2f}"
            print(line)

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": machine_name("cpu"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average": [load_before, os.getloadavg()[0]],
            "manifest": os.path.relpath(args.manifest.resolve(), ROOT),
            "number": args.number,
            "repeat": args.repeat,
            "microseconds_per_request": results,
            "baseline": baseline or None,
        }
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
