"""A tiny training configuration over the generated datasets of :mod:`tests.helpers.images`, and
a checkpoint write killed half-way."""

from __future__ import annotations

import signal
import subprocess
import sys
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


REPO = Path(__file__).resolve().parents[2]

_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from training.fit.checkpoint import atomic_write

def write(tmp):
    tmp.write_bytes(b"the first half of a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(Path(sys.argv[1]), write)
"""


def kill_mid_write(path: Path) -> None:
    """SIGKILL a process while ``training.fit.checkpoint.atomic_write`` writes ``path``, as a lost node would."""
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(path)], cwd=REPO, timeout=120)
    assert result.returncode == -signal.SIGKILL
