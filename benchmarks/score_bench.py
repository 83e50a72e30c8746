"""Serving cost of a feature-space score: raw batched inference with KNN beside MSP, one run.

Every configuration runs ``bundle.predict`` on the same preprocessed batch of real photos (the
model's whole serving step: forward pass, score, p-values, accept flags, results on the CPU). MSP
scores the logits; KNN computes the penultimate features in the same pass and scores them with one
matrix product against the bank and a top-k (``models.scoring.feature_scores.knn_distance``). Banks:

* ``knn-train``: the normalised features of ``--bank-images`` training photos of the data set,
  as ``mixoe calibrate`` would fit them;
* ``knn-<N>``: N random unit vectors, to show how the cost grows with the bank. The cost of a
  matrix product does not depend on the values, so random rows time what a real bank of that size
  would; their scores mean nothing and are not reported.

Two timings per configuration: the whole ``predict`` step, and the score alone (``msp`` on the
batch's logits; ``knn_distance`` on its features against the bank), which is what KNN adds. The
bundle's thresholds are not recalibrated for KNN: this measures time only. Configurations are
timed in interleaved rounds and the best round is reported (on a shared machine, the round least
disturbed by other work); the load average before and after goes into the JSON.

    python benchmarks/score_bench.py --seconds 2 --output benchmarks/results/score_bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from machine import machine_name  # a sibling module: the script's directory is on sys.path

from models.contract.manifest import ScoreSpec
from models.runtime import Bundle, load_bundle
from models.scoring.feature_scores import fit_knn_bank, knn_distance, normalized
from models.scoring.scores import msp

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models/repository/flowers17/2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/flowers17",
                        help="a data set with train.txt listing 'relative_path label' lines")
    parser.add_argument("--bank-images", type=int, default=400, help="training photos in the knn-train bank")
    parser.add_argument("--bank-sizes", type=int, nargs="*", default=[10_000, 50_000], help="random banks")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per configuration")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per configuration and round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, help="JSON report (e.g. benchmarks/results/score_bench_cpu.json)")
    return parser.parse_args()


def training_photos(data: Path, limit: int) -> list[Image.Image]:
    lines = (data / "train.txt").read_text().split("\n")
    paths = [data / line.split()[0] for line in lines if line.strip()][:limit]
    if not paths:
        raise SystemExit(f"no training images listed in {data / 'train.txt'}")
    return [Image.open(path).convert("RGB") for path in paths]


def with_knn(base: Bundle, bank: torch.Tensor, k: int) -> Bundle:
    """``base``'s network and manifest, deploying knn on ``bank`` (thresholds unchanged: timing only)."""
    manifest = base.manifest.model_copy(update={"score": ScoreSpec.default("knn", k)})
    return Bundle(base.path, manifest, base.model, base.device, {"bank": bank})


def seconds_per_call(call: Callable[[], object], seconds: float) -> float:
    """Mean seconds per ``call()`` over about ``seconds`` (at least 3 calls)."""
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        call()
        calls += 1
    return (time.perf_counter() - started) / calls


def main() -> None:
    args = parse_args()
    base = load_bundle(args.bundle, args.device)
    photos = training_photos(args.data, args.bank_images)
    with torch.inference_mode():
        features = torch.cat([base.model.forward_features(base.preprocess(photos[i:i + 32]).to(base.device))[1]
                              for i in range(0, len(photos), 32)]).cpu()
    generator = torch.Generator().manual_seed(0)
    banks = {f"knn-train ({len(photos)})": fit_knn_bank(features)}
    for size in args.bank_sizes:
        banks[f"knn-{size}"] = normalized(torch.randn(size, features.shape[1], generator=generator)).half()
    bundles = {"msp": base, **{name: with_knn(base, bank, args.k) for name, bank in banks.items()}}

    load_before = os.getloadavg()
    predict: dict[tuple[str, int], list[float]] = {}
    score_only: dict[tuple[str, int], list[float]] = {}
    for batch_size in args.batch_sizes:
        batch = base.preprocess([photos[i % len(photos)] for i in range(batch_size)])
        with torch.inference_mode():
            logits, batch_features = base.model.forward_features(batch.to(base.device))
        scorers = {"msp": lambda: msp(logits)}
        for name, bank in banks.items():
            on_device = bank.to(base.device, torch.float32)  # as the bundle holds it
            scorers[name] = lambda bank=on_device: knn_distance(batch_features, bank, args.k)
        for bundle in bundles.values():
            bundle.predict(batch)  # warm-up
        for _ in range(args.rounds):
            for name, bundle in bundles.items():
                key = (name, batch_size)
                predict.setdefault(key, []).append(seconds_per_call(lambda: bundle.predict(batch), args.seconds))
                score_only.setdefault(key, []).append(seconds_per_call(scorers[name], args.seconds / 4))

    rows = []
    for (name, batch_size), measured in predict.items():
        best, msp_best = min(measured), min(predict[("msp", batch_size)])
        rows.append({
            "score": name, "batch_size": batch_size, "predict_ms": 1000 * best, "images_per_s": batch_size / best,
            "vs_msp": msp_best / best, "score_ms": 1000 * min(score_only[(name, batch_size)]),
            "predict_ms_rounds": [1000 * m for m in measured],
        })
    print("| score (bank rows) | batch | predict ms/batch | images/s | throughput vs msp | score alone ms/batch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['score']} | {row['batch_size']} | {row['predict_ms']:.1f} | {row['images_per_s']:.1f} "
              f"| {row['vs_msp']:.2f} | {row['score_ms']:.3f} |")
    if args.output:
        report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_name(args.device),
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
            "torch_threads": torch.get_num_threads(),
            "bundle": str(args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle),
            "architecture": base.manifest.architecture,
            "k": args.k,
            "seconds_per_round": args.seconds,
            "results": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
