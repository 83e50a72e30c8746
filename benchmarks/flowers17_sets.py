"""Flowers-17 images as a trained bundle sees them (imported as a sibling module by benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from models.runtime import Bundle, Predictions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def id_images(bundle: Bundle, flowers: Path, lists: tuple[str, ...]) -> tuple[list[Path], NDArray[np.int64]]:
    """The images of the bundle's classes in Flowers-17's ``lists`` (e.g. ``test.txt``), with their
    labels as the bundle's class indices."""
    classes = (flowers / "classes.txt").read_text().split()
    known = bundle.manifest.class_names
    if not set(known) <= set(classes):
        raise SystemExit(f"the bundle's classes {sorted(set(known) - set(classes))} are not Flowers-17 species")
    entries = [line.split() for name in lists for line in (flowers / name).read_text().splitlines() if line.strip()]
    chosen = [(flowers / path, known.index(classes[int(label)])) for path, label in entries
              if classes[int(label)] in known]
    return [path for path, _ in chosen], np.array([label for _, label in chosen], dtype=np.int64)


def held_out_images(bundle: Bundle, flowers: Path) -> list[Path]:
    """Every image of the Flowers-17 species the bundle never saw."""
    species = sorted(path.name for path in (flowers / "images").iterdir() if path.is_dir())
    known = set(bundle.manifest.class_names)
    return sorted(path for name in species if name not in known for path in (flowers / "images" / name).glob("*.jpg"))


def predict_files(bundle: Bundle, files: list[Path], batch_size: int = 32) -> Predictions:
    """The bundle's answers for ``files``, as the service computes them, in one :class:`Predictions`."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            images = [Image.open(file) for file in files[start : start + batch_size]]
            parts.append(bundle.predict(bundle.preprocess(images)))
    return Predictions(
        **{field: torch.cat([getattr(part, field) for part in parts]) for field in
           ("logits", "probabilities", "scores", "p_values", "accepted")},
        operating_point=parts[0].operating_point,
    )
