"""``mixoe pipeline``: baseline -> fine-tune -> calibrate -> evaluate -> export, resumable.

Each finished stage is recorded in ``<output_dir>/pipeline.json`` and skipped on the next call; an
interrupted training stage resumes from its own ``last.pt``.

Under ``torchrun`` every rank trains both stages inside one process-group session (re-creating the
group between stages is unreliable, see :mod:`training.fit.distributed`); rank 0 alone then
calibrates, evaluates and exports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from training.assess.calibrate import calibrate
from training.assess.evaluate import evaluate
from training.config import MethodConfig, TrainConfig, save_config
from training.export import export
from training.fit.checkpoint import removed_if_failed
from training.fit.distributed import distributed_session
from training.fit.trainer import train

log = logging.getLogger(__name__)
STATE = "pipeline.json"


def baseline_config(config: TrainConfig, output_dir: Path) -> TrainConfig:
    """The cross-entropy stage of ``config``: its ``baseline`` section's epochs and optimizer
    (the top-level ones belong to the fine-tune), written to ``output_dir``."""
    return config.model_copy(
        update={
            "method": MethodConfig(name="baseline"),
            "epochs": config.baseline.epochs,
            "optimizer": config.baseline.optimizer,
            "init_checkpoint": None,
            "output_dir": output_dir,
        }
    )


def stage_configs(config: TrainConfig) -> tuple[TrainConfig, TrainConfig | None]:
    """The baseline stage's config and, unless the method is the baseline itself, the fine-tune's."""
    root = config.output_dir
    baseline = baseline_config(config, root / "baseline")
    if config.method.name == "baseline":
        return baseline, None
    finetune = config.model_copy(update={"init_checkpoint": root / "baseline", "output_dir": root / "finetune"})
    return baseline, finetune


def _run_stage(name: str, action: Callable[[], object], done: dict[str, str], state_path: Path, record: bool) -> None:
    """Run ``action`` unless stage ``name`` is in ``done``; ``record`` it in ``state_path`` (rank 0)."""
    if name in done:
        log.info("stage %s already finished, skipping", name)
        return
    done[name] = str(action())
    if record:
        state_path.write_text(json.dumps(done, indent=2))


def run_pipeline(config: TrainConfig) -> Path | None:
    """Run every unfinished stage; returns the exported bundle's directory (None on ranks > 0)."""
    config.data.require_every_id_class("the pipeline's bundle")
    root = config.output_dir
    state_path = root / STATE
    done: dict[str, str] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if "export" not in done:
        config.export.require_new_bundle()
    baseline, finetune = stage_configs(config)
    final = finetune or baseline
    with distributed_session(config.device) as ctx, removed_if_failed(root, ctx.is_main):
        if ctx.is_main:  # under torchrun, rank 0 alone writes
            root.mkdir(parents=True, exist_ok=True)
            save_config(config, root / "config.yaml")
        stage = partial(_run_stage, done=done, state_path=state_path, record=ctx.is_main)
        stage("baseline", lambda: train(baseline).run_dir)
        if finetune is not None:
            stage("finetune", lambda: train(finetune).run_dir)
    if not ctx.is_main:
        return None  # rank 0 alone calibrates, evaluates and exports
    stage("calibrate", lambda: calibrate(final).calibration.default_target)
    stage("evaluate", lambda: evaluate(final)["id_accuracy"])
    stage("export", lambda: export(final))
    return Path(done["export"])
