"""Selective classification on Flowers-17: does the certified error rate hold on real images?

For each bundle (default: the embedded one) its labelled ID images (the Flowers-17 validation and
test images of its classes) are scored once; then, over ``--splits`` random halvings into a
calibration and a test part, a confidence threshold is chosen on the calibration part and judged
on the test part, two ways:

* **certified**: Learn-then-Test (``models.calibration.selective``), the error rate among accepted
  images <= epsilon with probability >= 1 - delta; an epsilon the calibration part cannot certify
  counts as *refused* (``mixoe calibrate`` refuses to ship it);
* **naive**: the lowest confidence at which the calibration part's own error rate among accepted
  images is still <= epsilon, with no bound.

Reported per epsilon: the share of splits whose test error among accepted images exceeds epsilon
(the certified threshold promises at most delta for the true error rate; the test part's rate is
itself an estimate from fewer than 200 images, so this share overstates true violations for both
rules alike), the mean coverage (share of test images accepted) over the splits not refused, and
the share of splits refused.

    PYTHONPATH=$PWD python benchmarks/selective_risk.py [--bundle DIR ...]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from flowers17_sets import DATA, id_images, predict_files
from machine import machine_name
from serve_bench import default_bundle

from models.calibration.selective import accepted_counts, ranked_errors
from models.runtime import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, nargs="+", default=None, help="bundle folders (default: embedded)")
    parser.add_argument("--flowers", type=Path, default=DATA / "flowers17")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selective_risk_cpu.json")
    return parser.parse_args()


def naive_counts(confidences: NDArray[np.float64], errors: NDArray[np.bool_], epsilon: float) -> NDArray[np.int64]:
    """Per row, how many of the most confident calibration images the naive rule accepts: the most
    whose own error rate stays <= epsilon (whole tie groups at a time, as the certified rule)."""
    cumulative_errors, ends_group = ranked_errors(confidences, errors)
    accepted = np.arange(1, confidences.shape[-1] + 1)
    return np.max(np.where(ends_group & (cumulative_errors / accepted <= epsilon), accepted, 0), axis=1)


def judge(
    counts: NDArray[np.int64], cal_conf: NDArray[np.float64], test_conf: NDArray[np.float64],
    test_errors: NDArray[np.bool_], epsilon: float,
) -> dict[str, float]:
    """Test error among accepted images and coverage for each split's threshold (the ``count``-th
    largest calibration confidence; 0 = refused)."""
    refused = counts == 0
    thresholds = np.where(refused, np.inf, -np.sort(-cal_conf, axis=1)[np.arange(len(counts)), np.maximum(counts, 1) - 1])
    accepted = test_conf >= thresholds[:, None]
    coverage = accepted.mean(axis=1)
    risk = (accepted & test_errors).sum(axis=1) / np.maximum(accepted.sum(axis=1), 1)
    kept = ~refused
    return {
        "refused": float(refused.mean()),
        # A refused split accepts nothing and so breaks no promise: the guarantee counts it as kept.
        "violations": float(np.mean(kept & (risk > epsilon))),
        "coverage": float(coverage[kept].mean()) if kept.any() else 0.0,
        "mean_test_risk": float(risk[kept].mean()) if kept.any() else float("nan"),
    }


def evaluate(bundle_path: Path, args: argparse.Namespace) -> dict:
    """Every epsilon, both rules, over ``args.splits`` random halvings of the bundle's ID images."""
    bundle = load_bundle(bundle_path, "cpu")
    files, labels = id_images(bundle, args.flowers, ("val.txt", "test.txt"))
    predictions = predict_files(bundle, files)
    confidence = predictions.probabilities.max(dim=1).values.double().numpy()
    errors = predictions.probabilities.argmax(dim=1).numpy() != labels
    rng = np.random.default_rng(args.seed)
    order = np.argsort(rng.random((args.splits, len(files))), axis=1)
    half = len(files) // 2
    cal, test = order[:, :half], order[:, half:]
    rows = {}
    for epsilon in args.epsilons:
        certified = accepted_counts(confidence[cal], errors[cal], epsilon, args.delta)
        naive = naive_counts(confidence[cal], errors[cal], epsilon)
        rows[f"{epsilon:g}"] = {
            name: judge(counts, confidence[cal], confidence[test], errors[test], epsilon)
            for name, counts in (("certified", certified), ("naive", naive))
        }
    return {"bundle": f"{bundle.name}/{bundle.version}", "images": len(files), "calibration": half,
            "id_error": float(errors.mean()), "epsilons": rows}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results = [evaluate(path.resolve(), args) for path in (args.bundle or [default_bundle()])]
    print("| bundle (ID error) | epsilon | rule | splits with test error > epsilon | coverage | refused |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for epsilon, rules in result["epsilons"].items():
            for rule, row in rules.items():
                print(f"| {result['bundle']} ({result['id_error']:.1%}) | {epsilon} | {rule} | "
                      f"{row['violations']:.1%} | {row['coverage']:.1%} | {row['refused']:.1%} |")
    payload = {"date": date.today().isoformat(), "machine": machine_name("cpu"),
               "seconds": round(time.perf_counter() - started, 1), "delta": args.delta, "splits": args.splits,
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
