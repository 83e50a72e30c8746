"""False alarms and detection delays of the drift martingale beside the rejection-ratio alert.

Simulated OOD scores (higher = more OOD): in-distribution scores ~ N(0, 1), OOD scores ~ N(2, 1)
(an AUROC of 0.92). Every stream gets its own fresh calibration set of n ID scores, from which
the service's quantities follow: the smoothed p-value of each input, fed to the martingale
(``models.calibration.drift``, alarm at M >= 1/delta) twice, once against the fixed calibration set (as the
served p-values are: ``models.calibration.conformal``) and once in the online mode the service bets on
(against the calibration set and every earlier input: ``models.calibration.online_conformal``); and the 0.95
operating point's threshold
(``conformal_threshold``), whose rejections feed ``MixOERejectionRatioHigh`` as Prometheus would
evaluate it: at a traffic of ``r`` images per minute, every ``r`` images the rejection ratio over
the last ``5 r`` images is compared with 2 x 0.05, and the alert fires once that has held at 16
consecutive evaluations (``for: 15m``).

* no change: ``--steps`` ID inputs per stream; the share of streams with any alarm is the
  false-alarm rate over the whole stream (the martingale promises at most delta for exchangeable,
  i.e. fresh-calibration, data; within one stream the n calibration scores are shared).
* change: ``--before`` ID inputs, then each input is OOD with probability ``share``; the delay is
  the number of inputs after the change until the first alarm (streams that alarmed before the
  change are left out, streams that never alarm count as infinitely late).

    PYTHONPATH=$PWD python benchmarks/drift.py
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from machine import machine_name

from models.calibration.conformal import conformal_threshold, smoothed_p_values
from models.calibration.drift import DEFAULT_JUMP_RATE, PowerJumper, alarm_log10_level
from models.calibration.online_conformal import OnlineConformal

ROOT = Path(__file__).resolve().parents[1]
OOD_MEAN = 2.0
EXPECTED_REJECTION = 0.05  # the 0.95 operating point
RULE_EVALUATIONS = 16  # `for: 15m` at one evaluation per minute: 16 consecutive true evaluations


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[120, 500, 2000], help="calibration set sizes")
    parser.add_argument(
        "--shares", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5], help="OOD shares after the change"
    )
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=1000, help="no-change streams per n")
    parser.add_argument("--steps", type=int, default=5000, help="inputs per no-change stream")
    parser.add_argument("--change-runs", type=int, default=100, help="streams per n and OOD share")
    parser.add_argument("--before", type=int, default=1000, help="ID inputs before the change")
    parser.add_argument("--after", type=int, default=4000, help="inputs watched after the change")
    parser.add_argument("--rates", type=int, nargs="+", default=[20, 200], help="images per minute for the alert rule")
    parser.add_argument("--chunk", type=int, default=200, help="streams simulated at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drift_cpu.json")
    return parser.parse_args()


def stream_scores(rng: np.random.Generator, runs: int, before: int, after: int, share: float) -> NDArray[np.float64]:
    """(runs, before + after) scores: ID throughout ``before``, then OOD with probability ``share``."""
    scores = rng.standard_normal((runs, before + after))
    ood = rng.random((runs, after)) < share
    scores[:, before:] += OOD_MEAN * ood
    return scores


def first_alarms(
    scores: NDArray[np.float64], calibration: NDArray[np.float64], rng: np.random.Generator, args: argparse.Namespace
) -> dict[str, NDArray[np.int64]]:
    """Index of each stream's first alarm (-1: none), for the martingale and the rule at each rate."""
    runs, steps = scores.shape
    uniforms = 1.0 - rng.random(scores.shape)
    fixed = np.stack(
        [smoothed_p_values(row, cal, u) for row, cal, u in zip(scores, calibration, uniforms, strict=True)]
    )
    online = OnlineConformal(calibration, runs)
    level = alarm_log10_level(args.delta)
    martingales = {"martingale, fixed calibration": PowerJumper(runs), "martingale, online": PowerJumper(runs)}
    first = {name: np.full(runs, -1) for name in martingales}
    for step in range(steps):
        p_values = {
            "martingale, fixed calibration": fixed[:, step],
            "martingale, online": online.p_values(scores[:, step], uniforms[:, step]),
        }
        for name, martingale in martingales.items():
            crossed = martingale.update(p_values[name]) >= level
            first[name][(first[name] < 0) & crossed] = step
    thresholds = np.array([conformal_threshold(c, 1 - EXPECTED_REJECTION).threshold for c in calibration])
    rejected = np.cumsum(scores > thresholds[:, None], axis=1)
    for rate in args.rates:
        first[f"rule {rate}/min"] = rule_first_alarm(rejected, rate)
    return first


def rule_first_alarm(cumulative_rejections: NDArray[np.int64], rate: int) -> NDArray[np.int64]:
    """``MixOERejectionRatioHigh`` on a stream at ``rate`` images per minute (see the module doc)."""
    window = 5 * rate
    ends = np.arange(window, cumulative_rejections.shape[1] + 1, rate)  # an evaluation every minute
    counts = cumulative_rejections[:, ends - 1] - np.pad(cumulative_rejections, ((0, 0), (1, 0)))[:, ends - window]
    ratio = counts / window
    condition = ratio > EXPECTED_REJECTION + max(EXPECTED_REJECTION, 0.05)
    held = np.zeros(condition.shape[0], dtype=np.int64)
    first = np.full(condition.shape[0], -1)
    for column, end in enumerate(ends):
        held = np.where(condition[:, column], held + 1, 0)
        first[(first < 0) & (held >= RULE_EVALUATIONS)] = end - 1
    return first


def simulate(
    args: argparse.Namespace, n: int, runs: int, before: int, after: int, share: float, seed: int
) -> dict[str, NDArray[np.int64]]:
    """First alarms of ``runs`` streams, simulated ``args.chunk`` at a time (memory stays small)."""
    rng = np.random.default_rng(seed)
    parts: list[dict[str, NDArray[np.int64]]] = []
    for start in range(0, runs, args.chunk):
        size = min(args.chunk, runs - start)
        calibration = np.sort(rng.standard_normal((size, n)), axis=1)
        parts.append(first_alarms(stream_scores(rng, size, before, after, share), calibration, rng, args))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def delays(first: NDArray[np.int64], before: int) -> dict[str, float]:
    """Median and p90 inputs from the change to the alarm, over streams that had not alarmed before it."""
    valid = first[(first < 0) | (first >= before)]
    delay = np.where(valid < 0, np.inf, valid - before).astype(np.float64)
    median, p90 = np.quantile(delay, [0.5, 0.9], method="inverted_cdf")
    return {"median": float(median), "p90": float(p90), "missed": float(np.mean(np.isinf(delay)))}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows = []
    for index, n in enumerate(args.n):
        quiet = simulate(args, n, args.runs, args.steps, 0, 0.0, args.seed + 1000 * index)
        row: dict = {"n": n, "false_alarm": {name: float(np.mean(first >= 0)) for name, first in quiet.items()}}
        for share_index, share in enumerate(args.shares):
            seed = args.seed + 1000 * index + 1 + share_index
            changed = simulate(args, n, args.change_runs, args.before, args.after, share, seed)
            row[f"share {share:g}"] = {name: delays(first, args.before) for name, first in changed.items()}
        rows.append(row)
        print_row(row, args)
    result = {
        "date": date.today().isoformat(),
        "machine": machine_name("cpu"),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "jump_rate": DEFAULT_JUMP_RATE, "ood_mean": OOD_MEAN},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{result['seconds']} s; wrote {args.out}")


def print_row(row: dict, args: argparse.Namespace) -> None:
    """One markdown table block per n: false alarms, then median / p90 delay per OOD share."""
    shares = [key for key in row if key.startswith("share")]
    if row["n"] == args.n[0]:
        print(f"| n | detector | false alarms in {args.steps} ID inputs | " + " | ".join(
            f"delay at {key.split()[1]} OOD (median / p90)" for key in shares) + " |")
        print("|---" * (3 + len(shares)) + "|")
    for name, rate in row["false_alarm"].items():
        cells = []
        for key in shares:
            d = row[key][name]
            cells.append(f"{_inputs(d['median'])} / {_inputs(d['p90'])}")
        print(f"| {row['n']} | {name} | {rate:.2%} | " + " | ".join(cells) + " |", flush=True)


def _inputs(value: float) -> str:
    return "never" if np.isinf(value) else f"{value:.0f}"


if __name__ == "__main__":
    main()
