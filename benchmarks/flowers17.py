"""Oxford 17 Flowers, MixOE paper protocol: MSP / ODIN / Energy vs OE vs Energy-OE vs MixOE.

For each holdout split s (12 ID species from ``RandomState(s).choice(17, 12)``, 5 held out):

1. fine-tune ImageNet MobileNetV2 with cross-entropy (the baseline), scored with MSP, ODIN
   (temperature 1000) and Energy;
2. from that baseline, fine-tune OE, Energy-OE, MixOE-mixup and MixOE-cutmix against the
   Tiny-ImageNet train images (the outlier pool);
3. evaluate on the ID test images, on **fine** OOD = test images of the 5 held-out species, and on
   **coarse** OOD = Tiny-ImageNet val.

MixOE's beta is chosen on split 0 from ``--betas`` (alpha as in the paper: 1 for mixup, 2 for
cutmix) **without touching any OOD test set**: 20 Tiny-ImageNet classes are held out of the
outlier pool as validation outliers, and the criterion is the MSP AUROC of ID validation images
against them, among runs whose ID validation accuracy is within 2 points of the baseline's.

The split-0 MixOE variant with the better criterion is exported, calibrated at 0.90/0.95/0.99 ID
acceptance on the validation images, as ``<repository>/flowers17/<version>``. Prints the table
(mean ± std over splits) last and writes JSON + Markdown to ``--out``.

The defaults (160 px, baseline 6 epochs, fine-tunes 5, beta from {1, 5}, 12 pool images and 5
coarse images per Tiny-ImageNet class) fit three splits in about 1.5 hours on a 2-core CPU and a
few minutes on a GPU:

    python benchmarks/flowers17.py                      # the README's CPU table; GPU if present
    python benchmarks/flowers17.py --size 224 --baseline-epochs 10 --finetune-epochs 10 \
        --workers 12 --repository models/repository   # the README's GPU table and default bundle
    python benchmarks/flowers17.py --splits 0 --baseline-epochs 2 --finetune-epochs 1   # smoke run
    python benchmarks/flowers17.py --outliers-per-class 500 --coarse-per-class 50  # all of Tiny-ImageNet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from models.nets import offline_mobilenet_v2_weights
from training.calibrate import calibrate
from training.config import TrainConfig
from training.evaluate import evaluate
from training.export import export
from training.metrics import auroc
from training.scoring import ID_VAL, run_logits, scores_of
from training.trainer import train

# (row label, method section, deployed score) in table order; baseline rows share one run.
BASELINE_ROWS = [("MSP", "msp"), ("ODIN", "odin"), ("Energy", "energy")]
FINETUNES = {
    "OE": ({"name": "oe"}, "msp"),
    "Energy-OE": ({"name": "energy-oe"}, "energy"),
    "MixOE-mixup": ({"name": "mixoe", "mix": "mixup"}, "msp"),
    "MixOE-cutmix": ({"name": "mixoe", "mix": "cutmix"}, "msp"),
}
VALIDATION_OUTLIER_EVERY = 10  # every 10th Tiny-ImageNet class -> 20 validation-outlier classes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flowers", type=Path, default=Path("../shared/data/flowers17"))
    parser.add_argument("--tiny", type=Path, default=Path("../shared/data/tinyimagenet200"))
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--baseline-epochs", type=int, default=6)
    parser.add_argument("--baseline-lr", type=float, default=0.01)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=0.001)
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-coarse", type=int, default=None, help="subsample Tiny-ImageNet val (seeded)")
    parser.add_argument("--outliers-per-class", type=int, default=12,
                        help="use the first N (sorted) Tiny-ImageNet train images per class as the pool")
    parser.add_argument("--coarse-per-class", type=int, default=5,
                        help="use the first N (sorted) Tiny-ImageNet val images per class as coarse OOD")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/flowers17"))
    parser.add_argument("--repository", type=Path, default=None, help="export the default bundle here")
    parser.add_argument("--version", default="1")
    return parser.parse_args()


def validation_outlier_split(tiny_train: Path, scratch: Path) -> tuple[list[str], Path]:
    """Hold every 10th pool class out of training; link them into one validation-outlier folder."""
    classes = sorted(d.name for d in tiny_train.iterdir() if d.is_dir())
    held = classes[::VALIDATION_OUTLIER_EVERY]
    folder = scratch / "validation_outliers"
    folder.mkdir(parents=True, exist_ok=True)
    for name in held:
        link = folder / name
        if not link.exists():
            link.symlink_to((tiny_train / name).resolve(), target_is_directory=True)
    return held, folder


def first_per_class(split_dir: Path, per_class: int, scratch: Path) -> Path:
    """A folder of links to the first ``per_class`` (sorted) images of each class of ``split_dir``.

    Subsets keep evaluation cheap on a CPU and match what a GPU machine receiving at most 64 MiB
    of data can hold; a large ``per_class`` takes every image.
    """
    folder = scratch / f"{split_dir.name}_first{per_class}"
    for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        (folder / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            link = folder / class_dir.name / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return folder


def base_config(args: argparse.Namespace, split: int, run_dir: Path, held_out_pool: list[str], val_outliers: Path) -> dict:
    return {
        "architecture": "mobilenet_v2",
        "pretrained": str(offline_mobilenet_v2_weights()),
        "data": {
            "format": "list", "root": str(args.flowers), "classes_file": "classes.txt",
            "train": "train.txt", "val": "val.txt", "test": "test.txt",
            "holdout": {"num_id_classes": 12, "seed": split},
            "transforms": {"input_size": args.size, "resize": round(args.size * 256 / 224)},
            "num_workers": args.workers,
        },
        "outliers": {"root": str(args.pool), "exclude": held_out_pool},
        "batch_size": args.batch,
        "seed": split,
        "device": args.device,
        "output_dir": str(run_dir),
        "evaluation": {
            "ood_sets": {"coarse": str(args.coarse), "val_outliers": str(val_outliers)},
            "max_images_per_set": args.max_coarse,
        },
    }


def stage(raw: dict, **changes: Any) -> TrainConfig:
    return TrainConfig.model_validate({**raw, **changes})


def validation_criterion(config: TrainConfig) -> tuple[float, float]:
    """(ID validation accuracy, MSP AUROC of ID validation vs validation outliers): no OOD test data."""
    logits = run_logits(config).sets
    val = logits[ID_VAL]
    accuracy = float((val.logits.argmax(1) == val.labels).mean())
    return accuracy, auroc(scores_of(val, "msp"), scores_of(logits["val_outliers"], "msp"))


def row_metrics(evaluation: dict, score: str) -> dict[str, float]:
    per_set = evaluation["scores"][score]
    return {
        "id_accuracy": evaluation["id_accuracy"],
        "fine_tnr": per_set["fine"]["tnr_at_95tpr"], "fine_auroc": per_set["fine"]["auroc"],
        "coarse_tnr": per_set["coarse"]["tnr_at_95tpr"], "coarse_auroc": per_set["coarse"]["auroc"],
    }


def run_split(args, split: int, held: list[str], val_outliers: Path, betas: dict[str, float] | None) -> dict:
    """Train and evaluate every method on one split; returns per-row metrics and the chosen betas."""
    root = args.out / f"split{split}"
    raw = base_config(args, split, root / "baseline", held, val_outliers)
    baseline = stage(raw, method={"name": "baseline"}, epochs=args.baseline_epochs,
                     optimizer={"lr": args.baseline_lr})
    started = time.perf_counter()
    train(baseline)
    evaluation = evaluate(baseline)
    rows = {label: row_metrics(evaluation, score) for label, score in BASELINE_ROWS}
    base_accuracy, _ = validation_criterion(baseline)
    selection = {}
    for label, (method, score) in FINETUNES.items():
        candidates = betas_to_try = [None]
        if method["name"] == "mixoe":
            betas_to_try = [betas[label]] if betas else args.betas
            candidates = []
        for beta in betas_to_try:
            suffix = label.lower() + ("" if beta is None else f"-beta{beta:g}")
            config = stage(
                raw, method={**method, **({} if beta is None else {"beta": beta})},
                epochs=args.finetune_epochs, optimizer={"lr": args.finetune_lr},
                init_checkpoint=str(root / "baseline"), output_dir=str(root / suffix),
                evaluation={**raw["evaluation"], "score": score},
            )
            train(config)
            if beta is not None:
                accuracy, criterion = validation_criterion(config)
                candidates.append({"beta": beta, "val_accuracy": accuracy, "val_outlier_auroc": criterion,
                                   "config": config})
            else:
                candidates = [{"config": config}]
        if method["name"] == "mixoe" and len(candidates) > 1:
            eligible = [c for c in candidates if c["val_accuracy"] >= base_accuracy - 0.02] or candidates
            chosen = max(eligible, key=lambda c: c["val_outlier_auroc"])
            selection[label] = {
                "chosen_beta": chosen["beta"],
                "candidates": [{k: v for k, v in c.items() if k != "config"} for c in candidates],
            }
        else:
            chosen = candidates[0]
        chosen_config = chosen["config"]
        rows[label] = row_metrics(evaluate(chosen_config), score)
        rows[label]["run_dir"] = str(chosen_config.output_dir)
        if method["name"] == "mixoe":
            rows[label]["val_outlier_auroc"] = validation_criterion(chosen_config)[1]
    return {"split": split, "rows": rows, "selection": selection, "seconds": time.perf_counter() - started}


def summarize(results: list[dict]) -> list[dict]:
    labels = [label for label, _ in BASELINE_ROWS] + list(FINETUNES)
    table = []
    for label in labels:
        row = {"method": label}
        for key in ("id_accuracy", "fine_tnr", "fine_auroc", "coarse_tnr", "coarse_auroc"):
            values = [r["rows"][label][key] for r in results]
            row[key] = statistics.fmean(values)
            row[key + "_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        table.append(row)
    return table


def markdown(table: list[dict], n_splits: int) -> str:
    def cell(row: dict, key: str) -> str:
        return f"{100 * row[key]:.1f} ± {100 * row[key + '_std']:.1f}"

    head = ("| Method | ID acc. (%) | Fine TNR@95TPR (%) | Fine AUROC (%) | Coarse TNR@95TPR (%) | Coarse AUROC (%) |\n"
            "|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['method']} | " + " | ".join(cell(r, k) for k in
        ("id_accuracy", "fine_tnr", "fine_auroc", "coarse_tnr", "coarse_auroc")) + " |\n"
        for r in table
    )
    return head + body + f"\nMean ± std over {n_splits} holdout split(s); ID is the positive class.\n"


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.pool = first_per_class(args.tiny / "train", args.outliers_per_class, args.out)
    args.coarse = first_per_class(args.tiny / "val", args.coarse_per_class, args.out)
    held, val_outliers = validation_outlier_split(args.pool, args.out)
    results: list[dict] = []
    betas = None
    for split in args.splits:
        result = run_split(args, split, held, val_outliers, betas)
        if betas is None:  # chosen on the first split, reused on the others
            betas = {label: s["chosen_beta"] for label, s in result["selection"].items()}
            result["chosen_betas"] = betas
        results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps({"split": split, "seconds": round(result["seconds"], 1)}), flush=True)

    first = results[0]
    mixoe = [label for label in FINETUNES if label.startswith("MixOE")]
    best = max(mixoe, key=lambda label: first["rows"][label]["val_outlier_auroc"])
    bundle = None
    if args.repository is not None:
        raw = _saved_config(Path(first["rows"][best]["run_dir"]))
        raw["evaluation"]["ood_sets"].pop("val_outliers")  # the bundle reports the real OOD sets only
        raw["export"] = {"repository": str(args.repository), "name": "flowers17", "version": args.version}
        config = TrainConfig.model_validate(raw)
        calibrate(config)
        evaluate(config)
        bundle = str(export(config))

    table = summarize(results)
    settings = {k: str(v) for k, v in vars(args).items()}
    summary = {"settings": settings, "chosen_betas": betas, "default_bundle": bundle, "default_method": best,
               "table": table, "splits": results}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = markdown(table, len(results))
    (args.out / "table.md").write_text(text)
    print(f"\nMixOE betas chosen on split {args.splits[0]} (validation outliers only): {betas}; "
          f"default bundle: {best} -> {bundle}\n")
    print(text)


def _saved_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


if __name__ == "__main__":
    main()
