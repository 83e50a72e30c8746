"""The drift alarm on real Flowers-17 streams, beside the rejection-ratio rule and alibi-detect.

The service's situation, reproduced: one bundle (default: the embedded one) with its fixed
calibration scores (the ID validation images it was calibrated on), and streams of images it scores
one at a time. Images are scored once by the bundle and cached; a stream is a resampling of
those scores.

* ID pool: the bundle's classes' Flowers-17 *test* images (disjoint from its calibration images).
* Held-out species: every image of the Flowers-17 species the bundle never saw.
* Tiny-ImageNet: every 10th validation image (1,000).

Streams (``--runs`` no-change streams of ``--steps`` ID images; ``--change-runs`` per change, with
``--before`` ID images then each image OOD with the scenario's probability): no change, 5/10/20/50%
held-out species, 10% Tiny-ImageNet. Detectors on the same streams:

* the service's martingale (``models.calibration``: online smoothed p-values against the
  calibration scores and every earlier image, Jumper over power bets, alarm at ``1/delta``);
* ``MixOERejectionRatioHigh`` evaluated as Prometheus would at 20 and 200 images per minute
  (``benchmarks/drift.py`` describes the evaluation);
* alibi-detect's ``CVMDriftOnline`` on the OOD scores and ``FETDriftOnline`` on the rejection flags,
  run by ``benchmarks/drift_alibi.py`` in a virtual environment of their own (alibi-detect pins
  numpy < 2) on the streams this script saves, their expected run time set so that a false alarm
  within ``--steps`` images has probability ``delta``; ``--alibi FILE`` folds their first alarms in.

    PYTHONPATH=$PWD python benchmarks/drift_flowers17.py             # scores, streams, martingale, rule
    alibi-venv/bin/python benchmarks/drift_alibi.py runs/drift-flowers17/streams.npz
    PYTHONPATH=$PWD python benchmarks/drift_flowers17.py --alibi runs/drift-flowers17/alibi.json
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from drift import delays, rule_first_alarm
from flowers17_sets import DATA, held_out_images, id_images, predict_files
from machine import machine_name
from serve_bench import default_bundle

from models.calibration.drift import DEFAULT_JUMP_RATE, PowerJumper, alarm_log10_level
from models.calibration.online_conformal import OnlineConformal
from models.runtime import Bundle, load_bundle

ROOT = Path(__file__).resolve().parents[1]
OPERATING_POINT = 0.95
MARTINGALE = "martingale (service)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded one)")
    parser.add_argument("--flowers", type=Path, default=DATA / "flowers17")
    parser.add_argument("--tiny", type=Path, default=DATA / "tinyimagenet200" / "val")
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=200, help="no-change streams")
    parser.add_argument("--steps", type=int, default=20_000, help="images per no-change stream")
    parser.add_argument("--change-runs", type=int, default=100, help="streams per change scenario")
    parser.add_argument("--before", type=int, default=2_000, help="ID images before the change")
    parser.add_argument("--after", type=int, default=5_000, help="images watched after the change")
    parser.add_argument("--rates", type=int, nargs="+", default=[20, 200], help="images per minute for the rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "drift-flowers17", help="scores and streams")
    parser.add_argument("--alibi", type=Path, default=None, help="drift_alibi.py's output to fold in")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drift_flowers17_cpu.json")
    return parser.parse_args()


def image_sets(bundle: Bundle, flowers: Path, tiny: Path) -> dict[str, list[Path]]:
    """ID test images of the bundle's classes, all images of the other species, every 10th Tiny-ImageNet image."""
    return {
        "id": id_images(bundle, flowers, ("test.txt",))[0],
        "held_out": held_out_images(bundle, flowers),
        "tiny": sorted(tiny.glob("*/*.jpg"))[::10],
    }


def load_scores(args: argparse.Namespace) -> tuple[dict[str, NDArray[np.float32]], NDArray[np.float64], float]:
    """Scores of each image set (cached in ``--work``), the bundle's calibration scores and threshold."""
    bundle = load_bundle((args.bundle or default_bundle()).resolve(), "cpu")
    calibration = np.sort(np.asarray(bundle.manifest.calibration.scores, dtype=np.float64))
    threshold = bundle.operating_point(OPERATING_POINT).threshold
    cache = args.work / "scores.npz"
    if cache.exists():
        return dict(np.load(cache)), calibration, threshold
    scores = {name: predict_files(bundle, files).scores.numpy()
              for name, files in image_sets(bundle, args.flowers, args.tiny).items()}
    args.work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **scores)
    return scores, calibration, threshold


def scenarios() -> list[tuple[str, str | None, float]]:
    """(name, OOD set, share after the change); the first is the no-change stream."""
    changes = [(f"{share:.0%} held-out species", "held_out", share) for share in (0.05, 0.1, 0.2, 0.5)]
    return [("no change", None, 0.0), *changes, ("10% Tiny-ImageNet", "tiny", 0.1)]


def make_streams(
    rng: np.random.Generator, scores: dict[str, NDArray[np.float32]], ood: str | None, share: float,
    runs: int, before: int, after: int,
) -> NDArray[np.float32]:
    """(runs, before + after) scores: ID images resampled, then each OOD with probability ``share``."""
    stream = rng.choice(scores["id"], size=(runs, before + after))
    if ood is not None:
        swap = rng.random((runs, after)) < share
        stream[:, before:][swap] = rng.choice(scores[ood], size=int(swap.sum()))
    return stream


def first_alarms(
    streams: NDArray[np.float32], calibration: NDArray[np.float64], threshold: float,
    rng: np.random.Generator, args: argparse.Namespace,
) -> dict[str, NDArray[np.int64]]:
    """Index of each stream's first alarm (-1: none) for the martingale and the rule at each rate."""
    runs, steps = streams.shape
    online = OnlineConformal(calibration, runs)
    martingale = PowerJumper(runs)
    level = alarm_log10_level(args.delta)
    first = np.full(runs, -1)
    for step in range(steps):
        p_values = online.p_values(streams[:, step], 1.0 - rng.random(runs))
        crossed = martingale.update(p_values) >= level
        first[(first < 0) & crossed] = step
    rejected = np.cumsum(streams > threshold, axis=1)
    return {MARTINGALE: first, **{f"rule {rate}/min": rule_first_alarm(rejected, rate) for rate in args.rates}}


def summary(first: NDArray[np.int64], quiet: bool, before: int) -> dict[str, float]:
    """A no-change stream's false-alarm share, or a change's detection delays (``drift.delays``)."""
    return {"false_alarm": float(np.mean(first >= 0))} if quiet else delays(first, before)


def save_streams(
    args: argparse.Namespace, streams: dict[str, NDArray[np.float32]], calibration: NDArray[np.float64],
    threshold: float,
) -> Path:
    """Everything ``drift_alibi.py`` needs, numpy only: the streams, change points, calibration and threshold."""
    path = args.work / "streams.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(streams)
    np.savez(
        path, names=np.array(names), calibration=calibration, threshold=threshold, delta=args.delta,
        horizon=args.steps, before=np.array([0 if name == "no change" else args.before for name in names]),
        **{f"stream_{index}": stream for index, stream in enumerate(streams.values())},
    )
    return path


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    scores, calibration, threshold = load_scores(args)
    rng = np.random.default_rng(args.seed)
    alibi = json.loads(args.alibi.read_text())["first_alarms"] if args.alibi else {}
    streams: dict[str, NDArray[np.float32]] = {}
    rows = []
    for name, ood, share in scenarios():
        quiet = ood is None
        runs, before, after = (args.runs, args.steps, 0) if quiet else (args.change_runs, args.before, args.after)
        streams[name] = make_streams(rng, scores, ood, share, runs, before, after)
        first = first_alarms(streams[name], calibration, threshold, rng, args)
        first |= {detector: np.asarray(by_scenario[name]) for detector, by_scenario in alibi.items()}
        rows.append({"scenario": name, **{detector: summary(f, quiet, before) for detector, f in first.items()}})
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"streams for drift_alibi.py: {save_streams(args, streams, calibration, threshold)}")
    print_table(rows)
    result = {
        "date": date.today().isoformat(), "machine": machine_name("cpu"),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "jump_rate": DEFAULT_JUMP_RATE, "threshold": threshold, "n_calibration": len(calibration),
                     "pool_sizes": {name: len(values) for name, values in scores.items()}},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{result['seconds']} s; wrote {args.out}")


def print_table(rows: list[dict]) -> None:
    """Markdown: per detector, false alarms over the no-change streams and median / p90 delay per change."""
    changes = [row for row in rows if row["scenario"] != "no change"]
    quiet = next(row for row in rows if row["scenario"] == "no change")
    print("| detector | false alarms | " + " | ".join(f"{row['scenario']} (median / p90)" for row in changes) + " |")
    print("|---" * (2 + len(changes)) + "|")
    for detector in (key for key in quiet if key != "scenario"):
        cells = [f"{_images(row[detector]['median'])} / {_images(row[detector]['p90'])}" for row in changes]
        print(f"| {detector} | {quiet[detector]['false_alarm']:.1%} | " + " | ".join(cells) + " |")


def _images(value: float) -> str:
    return "never" if np.isinf(value) else f"{value:.0f}"


if __name__ == "__main__":
    main()
