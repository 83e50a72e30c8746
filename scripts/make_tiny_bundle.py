#!/usr/bin/env python3
"""Write a tiny, valid model bundle plus one image it accepts and one it rejects.

For smoke tests of a deployment (``scripts/build_image.sh``, ``tests/deploy/``) where the real
default model may not exist yet, or is too slow to load: a randomly initialised MobileNetV2 with a
2-way head at 32 px, saved with :func:`models.contract.bundle.save_bundle`. The thresholds are not
calibrated on data; they are placed between the OOD scores that the saved bundle itself gives two
generated images, so the outcome is known in advance:

* ``accept.png`` scores below both thresholds (accepted at either operating point),
* ``reject.png`` scores above both (rejected at either).

Two operating points ship, 0.95 (the default) and 0.90, each the k-th smallest of 19 synthetic
calibration scores with k = ceil(target * (n + 1)), as ``models.contract.manifest`` requires.

    .venv/bin/python scripts/make_tiny_bundle.py /tmp/repository --images /tmp/images
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout: make `models` importable
    sys.path.insert(0, str(ROOT))

from models.contract.bundle import save_bundle  # noqa: E402
from models.contract.manifest import Calibration, Manifest, OperatingPoint, ScoreSpec  # noqa: E402
from models.network.nets import build_network  # noqa: E402
from models.network.preprocess import Preprocessing  # noqa: E402
from models.runtime import load_bundle  # noqa: E402

N_CALIBRATION = 19
TARGETS = (0.95, 0.90)
MIN_GAP = 1e-3  # smallest score gap between the two images: far above float noise across batch sizes
PREPROCESSING = Preprocessing(input_size=32, resize=32)


def _candidate_images(size: int = 48) -> dict[str, Image.Image]:
    """Plain colours and a noise pattern: the random network scores them quite differently."""
    rng = np.random.default_rng(0)
    images = {
        name: Image.new("RGB", (size, size), colour)
        for name, colour in {
            "black": (0, 0, 0),
            "white": (255, 255, 255),
            "red": (220, 20, 20),
            "green": (20, 200, 40),
            "blue": (30, 40, 230),
        }.items()
    }
    images["noise"] = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
    return images


def _fit_batch_norm_statistics(model: torch.nn.Module, batches: int = 4) -> None:
    """Give BatchNorm running statistics from random inputs.

    Freshly initialised BatchNorm layers (mean 0, variance 1) make a deep random network's
    penultimate features collapse to the same vector for every input; statistics measured on
    inputs keep the activations spread out, so different images get different scores.
    """
    generator = torch.Generator().manual_seed(0)
    size = PREPROCESSING.input_size
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, 3, size, size, generator=generator))
    model.eval()


def _manifest(name: str, version: str, low: float, high: float) -> Manifest:
    """Calibration whose 0.90 and 0.95 thresholds lie 1/4 and 1/2 of the way from ``low`` to ``high``."""
    gap = high - low
    thresholds = {0.90: low + gap / 4, 0.95: low + gap / 2}
    # 17 scores below the 0.90 threshold, then the two thresholds: k = 18 and k = 19 of n = 19.
    scores = [low - gap * (17 - i) / 17 for i in range(17)] + [thresholds[0.90], thresholds[0.95]]
    points = []
    for target in TARGETS:
        k = math.ceil(target * (N_CALIBRATION + 1))
        assert scores[k - 1] == thresholds[target], (k, target)
        points.append(
            OperatingPoint(target_id_acceptance=target, threshold=scores[k - 1], k=k, n_calibration=N_CALIBRATION)
        )
    return Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC).isoformat(),
        architecture="mobilenet_v2",
        num_classes=2,
        class_names=["ant", "bee"],
        preprocessing=PREPROCESSING,
        score=ScoreSpec(name="msp", temperature=1.0),
        calibration=Calibration(scores=scores, operating_points=points, default_target=0.95),
        training={"method": "none", "note": "random weights; thresholds placed for smoke tests"},
    )


def make_tiny_bundle(repository: Path, images: Path, name: str = "tiny", version: str = "1", seed: int = 0) -> Path:
    """Write ``repository/name/version`` and ``images/{accept,reject}.png``; return the bundle path."""
    torch.manual_seed(seed)
    model = build_network("mobilenet_v2", 2)
    images.mkdir(parents=True, exist_ok=True)
    candidates = _candidate_images()
    _fit_batch_norm_statistics(model)
    paths = {}
    for image_name, image in candidates.items():
        paths[image_name] = images / f"candidate-{image_name}.png"
        image.save(paths[image_name])

    # Score the images exactly as the service will: through a saved and reloaded bundle.
    staging = images / ".staging"
    probe = save_bundle(staging / name / version, model, _manifest(name, version, 0.0, 1.0))
    bundle = load_bundle(probe)
    decoded = [Image.open(paths[n]).convert("RGB") for n in candidates]
    scores = dict(zip(candidates, bundle.predict(bundle.preprocess(decoded)).scores.tolist(), strict=True))
    low_name, high_name = max(combinations(scores, 2), key=lambda pair: abs(scores[pair[0]] - scores[pair[1]]))
    if scores[low_name] > scores[high_name]:
        low_name, high_name = high_name, low_name
    if scores[high_name] - scores[low_name] < MIN_GAP:
        raise RuntimeError(f"generated images score too close together to separate: {scores}")
    for path in sorted(staging.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    staging.rmdir()

    directory = save_bundle(
        Path(repository) / name / version, model, _manifest(name, version, scores[low_name], scores[high_name])
    )
    paths[low_name].replace(images / "accept.png")
    paths[high_name].replace(images / "reject.png")
    for leftover in images.glob("candidate-*.png"):
        leftover.unlink()
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path, help="model repository to write <name>/<version>/ into")
    parser.add_argument("--images", type=Path, required=True, help="where to write accept.png and reject.png")
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--version", default="1")
    args = parser.parse_args(argv)
    directory = make_tiny_bundle(args.repository, args.images, args.name, args.version)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    thresholds = {p["target_id_acceptance"]: p["threshold"] for p in manifest["calibration"]["operating_points"]}
    print(f"wrote {directory} (thresholds {thresholds}) and {args.images}/accept.png, reject.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
