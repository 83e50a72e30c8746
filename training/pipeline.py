"""``mixoe pipeline``: baseline -> fine-tune -> calibrate -> evaluate -> export, resumable.

Each finished stage is recorded in ``<output_dir>/pipeline.json`` and skipped on the next call; an
interrupted training stage resumes from its own ``last.pt``.
"""

from __future__ import annotations

import json
import os
import logging
from collections.abc import Callable
from pathlib import Path

from training.calibrate import calibrate
from training.config import MethodConfig, TrainConfig, save_config
from training.evaluate import evaluate
from training.export import export
from training.trainer import train

log = logging.getLogger(__name__)
STATE = "pipeline.json"


def stage_configs(config: TrainConfig) -> tuple[TrainConfig, TrainConfig | None]:
    """The baseline stage's config and, unless the method is the baseline itself, the fine-tune's."""
    root = config.output_dir
    baseline = config.model_copy(
        update={
            "method": MethodConfig(name="baseline"),
            "epochs": config.baseline.epochs,
            "optimizer": config.baseline.optimizer,
            "init_checkpoint": None,
            "output_dir": root / "baseline",
        }
    )
    if config.method.name == "baseline":
        return baseline, None
    finetune = config.model_copy(update={"init_checkpoint": root / "baseline", "output_dir": root / "finetune"})
    return baseline, finetune


def run_pipeline(config: TrainConfig) -> Path | None:
    """Run every unfinished stage; returns the exported bundle's directory (None on ranks > 0)."""
    root = config.output_dir
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone writes
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        save_config(config, root / "config.yaml")
    state_path = root / STATE
    done: dict[str, str] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    baseline, finetune = stage_configs(config)
    final = finetune or baseline

    def stage(name: str, action: Callable[[], object]) -> None:
        if name in done:
            log.info("stage %s already finished, skipping", name)
            return
        result = action()
        done[name] = str(result)
        if is_main:
            state_path.write_text(json.dumps(done, indent=2))

    stage("baseline", lambda: train(baseline).run_dir)
    if finetune is not None:
        stage("finetune", lambda: train(finetune).run_dir)
    if not is_main:
        return None  # rank 0 alone calibrates, evaluates and exports
    stage("calibrate", lambda: calibrate(final).default_target)
    stage("evaluate", lambda: evaluate(final)["id_accuracy"])
    stage("export", lambda: export(final))
    return Path(done["export"])
