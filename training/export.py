"""``mixoe export``: turn a calibrated, evaluated run into a bundle in a model repository.

The bundle (``<repository>/<name>/<version>/``) is the contract with the service: weights as
safetensors, a validated manifest (architecture, preprocessing, classes, score, operating points
with the calibration scores, metrics, training settings, data fingerprints, weights hash), and a
report with its plots.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from models.contract.bundle import save_bundle
from models.contract.manifest import Manifest
from models.network.nets import build_network
from training.assess.calibrate import load_calibration, require_current_weights
from training.assess.evaluate import EVALUATION_JSON
from training.assess.report import write_report
from training.assess.scoring import ID_TEST, FittedScore, run_logits
from training.config import TrainConfig
from training.data.datasets import Sample, fingerprint
from training.data.experiment import load_experiment_data
from training.data.splits import pool_files
from training.data.transforms import preprocessing_of
from training.fit.checkpoint import BEST_INFO, load_best_weights


def _pool_fingerprint(config: TrainConfig) -> str:
    """Fingerprint of the outlier pool the method trained against (MixOE's key input)."""
    files = pool_files(config.outliers)
    return fingerprint([Sample(path, -1) for path in files])


def export(config: TrainConfig, signer: Callable[[bytes], bytes] | None = None) -> Path:
    """Write the run's bundle and return its directory; ``signer`` (an Ed25519 private key's
    ``sign``) also writes its ``manifest.sig`` (see ``models.contract.trust``)."""
    run_dir = config.output_dir
    evaluation_path = run_dir / EVALUATION_JSON
    if not evaluation_path.is_file():
        raise FileNotFoundError(f"{evaluation_path} not found: run 'mixoe evaluate' first")
    config.data.require_every_id_class("the exported bundle")
    evaluation = json.loads(evaluation_path.read_text())
    require_current_weights(config, evaluation["weights_sha256"], "evaluation")
    record = load_calibration(config)
    calibration, score_name = record.calibration, record.score.name
    run = run_logits(config)
    logits = run.sets
    data = load_experiment_data(config.data)
    model = build_network(config.architecture, data.num_classes)
    model.load_state_dict(load_best_weights(run_dir))
    best = json.loads((run_dir / BEST_INFO).read_text())
    export_config = config.export
    manifest = Manifest(
        name=export_config.name,
        version=export_config.version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        architecture=config.architecture,
        num_classes=data.num_classes,
        class_names=data.class_names,
        preprocessing=preprocessing_of(config.data.transforms),
        score=record.score,
        calibration=calibration,
        selective=record.selective,
        precision=record.precision,
        metrics=evaluation,
        training={
            "method": config.method.model_dump(mode="json"),
            "optimizer": config.optimizer.model_dump(mode="json"),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "pretrained": config.pretrained,
            "best_epoch": best["epoch"],  # the kept epoch, by kept_epoch_rule
            "best_val_accuracy": best["val_accuracy"],
            "kept_epoch_rule": config.kept_epoch_rule,
            "holdout": None if config.data.holdout is None else config.data.holdout.model_dump(),
            "transforms": config.data.transforms.model_dump(mode="json"),
            "outliers": None if config.outliers is None else config.outliers.model_dump(mode="json"),
            "init_checkpoint": None if config.init_checkpoint is None else str(config.init_checkpoint),
            "id_classes_original_indices": data.id_classes,
            "score_fit": record.score_fit,
        },
        data_fingerprints={
            "train": fingerprint(data.train.samples),
            "val": fingerprint(data.val.samples),
            **({"test": fingerprint(data.test.samples)} if data.test is not None else {}),
            **({"outliers": _pool_fingerprint(config)} if config.outliers is not None else {}),
        },
    )
    score = FittedScore(record.score, record.state)
    with tempfile.TemporaryDirectory() as scratch:
        report_dir = Path(scratch)
        write_report(
            report_dir,
            title=f"{export_config.name} v{export_config.version}: {config.method.name} on {config.architecture}",
            summary={
                "model": f"{export_config.name}/{export_config.version}",
                "architecture": config.architecture,
                "method": config.method.name,
                "deployed score": score_name,
                "ID classes": data.num_classes,
                "ID test accuracy": evaluation["id_accuracy"],
                "calibration images": len(calibration.scores),
            },
            evaluation={
                **evaluation,
                "operating_points": [p.model_dump() for p in calibration.operating_points],
                "risk_levels": [level.model_dump() for level in (record.selective.risk_levels if record.selective else [])],
            },
            id_scores=score(logits[ID_TEST]),
            ood_scores={name: score(logits[name]) for name in run.ood_set_names()},
            thresholds={p.target_id_acceptance: p.threshold for p in calibration.operating_points},
            score_name=score_name,
        )
        extra = {path.name: path for path in report_dir.iterdir()}
        return save_bundle(
            export_config.bundle_dir, model, manifest, extra_files=extra, signer=signer, score_state=record.state or None
        )
