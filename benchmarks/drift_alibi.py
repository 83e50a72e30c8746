"""alibi-detect's online drift detectors on the streams ``drift_flowers17.py`` saved.

Runs in a virtual environment of its own (alibi-detect pins numpy < 2; it is never a dependency of
the service), and needs nothing of the project: the streams file holds the calibration scores,
the operating point's threshold, the false-alarm budget and the streams.

* ``CVMDriftOnline`` (Cramér-von Mises, windowed) on the OOD scores, the calibration scores as its
  reference;
* ``FETDriftOnline`` (Fisher's exact test, windowed) on the rejection flags (score above the
  threshold), the calibration images' flags as its reference.

Both are configured, as alibi-detect does, by an expected run time (ERT) under no change: set to
``horizon / -ln(1 - delta)``, so that with alibi-detect's constant per-image false-alarm rate
``1 / ERT`` a false alarm within the no-change stream's ``horizon`` images has probability
``delta``: the budget the martingale works to. Their thresholds are simulated with more bootstrap
streams than the ERT (alibi-detect refuses fewer).

    python -m venv alibi-venv && alibi-venv/bin/pip install alibi-detect
    alibi-venv/bin/python benchmarks/drift_alibi.py runs/drift-flowers17/streams.npz
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from alibi_detect.cd import CVMDriftOnline, FETDriftOnline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("streams", type=Path, help="streams.npz written by drift_flowers17.py")
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--bootstrap-factor", type=float, default=1.1, help="bootstrap streams per unit of ERT")
    parser.add_argument("--out", type=Path, default=None, help="default: alibi.json beside the streams")
    return parser.parse_args()


def first_alarm(detector, stream: np.ndarray) -> int:
    """Index of the first image at which ``detector`` flags drift, or -1."""
    detector.reset_state()
    for index, value in enumerate(stream):
        if detector.predict(np.array([value], dtype=np.float32))["data"]["is_drift"]:
            return index
    return -1


def main() -> None:
    args = parse_args()
    saved = np.load(args.streams)
    calibration, threshold = saved["calibration"].astype(np.float32), float(saved["threshold"])
    ert = float(saved["horizon"]) / -math.log1p(-float(saved["delta"]))
    options = {"ert": ert, "window_sizes": args.window_sizes, "n_bootstraps": math.ceil(args.bootstrap_factor * ert),
               "verbose": False}
    started = time.perf_counter()
    detectors = {
        "alibi CVMDriftOnline (scores)": (CVMDriftOnline(calibration, **options), lambda s: s),
        "alibi FETDriftOnline (rejections)": (
            FETDriftOnline((calibration > threshold).astype(np.float32), **options),
            lambda s: (s > threshold).astype(np.float32),
        ),
    }
    print(f"configured at ERT {ert:.0f} in {time.perf_counter() - started:.0f} s", flush=True)
    first_alarms: dict[str, dict[str, list[int]]] = {name: {} for name in detectors}
    for index, scenario in enumerate(saved["names"]):
        streams = saved[f"stream_{index}"]
        for name, (detector, feature) in detectors.items():
            first_alarms[name][str(scenario)] = [first_alarm(detector, feature(stream)) for stream in streams]
        print(f"{scenario}: {time.perf_counter() - started:.0f} s", flush=True)
    out = args.out or args.streams.with_name("alibi.json")
    out.write_text(json.dumps({"ert": ert, "options": options, "seconds": round(time.perf_counter() - started, 1),
                               "first_alarms": first_alarms}) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
