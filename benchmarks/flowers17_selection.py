"""Which validation-only criterion would pick the run that detects held-out species best?

``mixoe compare`` chooses a method and score without touching any OOD test set. This checks,
after the fact, how well candidate criteria rank a comparison's runs (every method of each split
and seed) in the order of their *fine* OOD test AUROC, the thing the choice should optimise:

* ``val_outliers``  MSP AUROC of ID validation images vs the validation outliers (the criterion
                    the retired ``benchmarks/flowers17.py`` used);
* ``mixed``         vs ID validation images blended 50/50 with validation outliers (what
                    ``mixoe compare`` now selects by, after this script's first run);
* ``shuffled``      vs ID validation images cut into 4 x 4 tiles and shuffled: flower colour and
                    texture without a flower's shape, a synthetic near-OOD set.

All use MSP, the score the MixOE runs deploy. It prints, per split, Spearman's rank correlation of
each criterion with the fine test AUROC across runs (1 = a perfect proxy), and writes JSON. It
reads the test sets only to evaluate the criteria, so the result informs the next choice of
criterion; using it to re-pick beta on these same splits would leak the test sets.

    python benchmarks/flowers17_selection.py runs/flowers17-compare-cpu   # a compare output_dir
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from models.network.nets import build_network, deployed_logits
from models.network.preprocess import EvalTransform
from models.scoring.scores import get_score
from training.assess.metrics import auroc
from training.assess.scoring import FINE, ID_TEST, ID_VAL, assessment_sets, run_logits, scores_of
from training.config import TrainConfig
from training.data.experiment import load_experiment_data
from training.data.transforms import preprocessing_of
from training.fit.checkpoint import load_best_weights

CRITERIA = ("val_outliers", "mixed", "shuffled")
TILES = 4


def shuffle_tiles(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(3, S, S) -> the same image cut into TILES x TILES tiles, put back in a random order."""
    _, height, width = image.shape
    th, tw = height // TILES, width // TILES
    tiles = [image[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(TILES) for j in range(TILES)]
    order = rng.permutation(len(tiles))
    rows = [torch.cat([tiles[order[i * TILES + j]] for j in range(TILES)], dim=2) for i in range(TILES)]
    return torch.cat(rows, dim=1)


def criteria_of(run_dir: Path) -> dict[str, float]:
    """Every criterion and the fine test AUROC for one trained run (CPU, fp32)."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = TrainConfig.model_validate({**raw, "device": "cpu"})
    logits = run_logits(config).sets
    sets = assessment_sets(config)
    transform = EvalTransform(preprocessing_of(config.data.transforms))
    rng = np.random.default_rng(0)
    val = torch.stack([transform(Image.open(s.path).convert("RGB")) for s in sets[ID_VAL]])
    outliers = sets["val_outliers"]
    picked = rng.choice(len(outliers), len(val), replace=len(outliers) < len(val))
    blend = torch.stack([transform(Image.open(outliers[i].path).convert("RGB")) for i in picked])
    model = build_network(config.architecture, len(load_experiment_data(config.data).class_names))
    model.load_state_dict(load_best_weights(run_dir))
    model.eval()

    def scored(batch: torch.Tensor) -> np.ndarray:
        return get_score("msp")(deployed_logits(model, batch, "fp32")).double().numpy()

    id_val = scores_of(logits[ID_VAL], "msp")
    return {
        "val_outliers": auroc(id_val, scores_of(logits["val_outliers"], "msp")),
        "mixed": auroc(id_val, scored(0.5 * val + 0.5 * blend)),
        "shuffled": auroc(id_val, scored(torch.stack([shuffle_tiles(image, rng) for image in val]))),
        "fine_test": auroc(scores_of(logits[ID_TEST], "msp"), scores_of(logits[FINE], "msp")),
    }


def spearman(a: list[float], b: list[float]) -> float:
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the output_dir of a 'mixoe compare' run")
    parser.add_argument("--out", type=Path, help="JSON file; default <results>/selection.json")
    args = parser.parse_args()
    splits = sorted(p for p in args.results.glob("split*/seed*") if p.is_dir())
    if not splits:
        raise SystemExit(f"no split*/seed*/ folders under {args.results}: pass the output_dir of 'mixoe compare'")
    report = {}
    print(f"| split | runs | {' | '.join(CRITERIA)} |\n|---|---|{'---|' * len(CRITERIA)}")
    for split in splits:
        runs = {d.name: criteria_of(d) for d in sorted(split.iterdir()) if (d / "config.yaml").is_file()}
        fine = [r["fine_test"] for r in runs.values()]
        correlation = {c: spearman([r[c] for r in runs.values()], fine) for c in CRITERIA}
        unit = split.relative_to(args.results).as_posix()
        report[unit] = {"runs": runs, "spearman_with_fine_auroc": correlation}
        print(f"| {unit} | {len(runs)} | " + " | ".join(f"{correlation[c]:+.2f}" for c in CRITERIA) + " |")
    out = args.out or args.results / "selection.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nSpearman correlation with fine-OOD test AUROC across runs (MSP); wrote {out}")


if __name__ == "__main__":
    main()
