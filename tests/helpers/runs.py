"""A tiny training configuration over the generated datasets of :mod:`tests.helpers.images`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import TrainConfig


def tiny_config(data_root: Path, output_dir: Path, **changes: Any) -> TrainConfig:
    """ResNet-18 at 32 px, batch 8, 2 epochs on CPU; ``changes`` replace top-level sections.

    ``data_root`` holds ``id/{train,val,test}/<class>/``, ``outliers/`` and ``far/`` (coarse OOD).
    """
    raw: dict[str, Any] = {
        "architecture": "resnet18",
        "data": {"root": str(data_root / "id"), "num_workers": 0, "transforms": {"input_size": 32, "resize": 36}},
        "outliers": {"root": str(data_root / "outliers")},
        "batch_size": 8,
        "epochs": 2,
        "seed": 7,
        "device": "cpu",
        "optimizer": {"lr": 0.01},
        "output_dir": str(output_dir),
        "baseline": {"epochs": 2, "optimizer": {"lr": 0.01}},
        "evaluation": {
            "ood_sets": {"coarse": str(data_root / "far")}, "calibration_targets": [0.8, 0.9], "default_target": 0.9
        },
    }
    raw.update(changes)
    return TrainConfig.model_validate(raw)
