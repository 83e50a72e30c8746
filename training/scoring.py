"""Logits of a trained run on every assessment set, computed once and cached in the run directory.

Evaluation, calibration and export all need the same forward passes (ID validation, ID test, each
OOD set). They share :func:`run_logits`, which caches the arrays in ``<run>/logits.npz`` keyed by
everything they depend on (weights, preprocessing, precision, the images of every set), so a later
stage never recomputes them and a changed input never reuses stale ones. Images go through
:class:`models.preprocess.EvalTransform` and :func:`models.nets.deployed_logits`, exactly as in
the service, at the precision the bundle will record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.bundle import sha256_file
from models.nets import Precision, build_network, default_precision, deployed_logits, resolve_device
from models.preprocess import EvalTransform, Preprocessing
from models.scores import SCORES
from training.checkpoint import BEST_WEIGHTS, atomic_write, load_best_weights
from training.config import TrainConfig
from training.data import ImageDataset, Sample, collate_skipping_bad, fingerprint
from training.experiment import load_experiment_data
from training.splits import ood_sets
from training.transforms import preprocessing_of

ID_VAL, ID_TEST, FINE = "id_val", "id_test", "fine"
CACHE = "logits.npz"


@dataclass(frozen=True)
class SetLogits:
    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64; -1 for OOD sets


def assessment_sets(config: TrainConfig) -> dict[str, list[Sample]]:
    """``id_val`` (calibration), ``id_test``, ``fine`` (held-out classes) and each named OOD set."""
    data = load_experiment_data(config.data)
    sets = {ID_VAL: data.val.samples}
    if data.test is not None:
        sets[ID_TEST] = data.test.samples
    if data.fine_ood_test is not None:
        sets[FINE] = [Sample(s.path, -1) for s in data.fine_ood_test.samples]
    rng = np.random.default_rng(config.seed)
    for name, paths in ood_sets(config).items():
        if name in sets:
            raise ValueError(f"OOD set name {name!r} is reserved; choose another")
        limit = config.evaluation.max_images_per_set
        if limit is not None and len(paths) > limit:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
        sets[name] = [Sample(p, -1) for p in paths]
    return sets


def collect_logits(
    model: torch.nn.Module, samples: list[Sample], preprocessing: Preprocessing, device: torch.device,
    precision: Precision, batch_size: int, workers: int,
) -> SetLogits:
    dataset = ImageDataset(samples, EvalTransform(preprocessing))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
    )
    cuda = device.type == "cuda"
    model.eval().to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    logits, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        logits.append(deployed_logits(model, images, precision))
        labels.append(targets)
    num_classes = model.num_classes
    return SetLogits(
        torch.cat(logits).numpy() if logits else np.zeros((0, num_classes), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
    )


@dataclass(frozen=True)
class RunLogits:
    """Logits per assessment set, and what they were computed from: which weights, which precision."""

    sets: dict[str, SetLogits]
    weights_sha256: str
    precision: Precision

    def ood_set_names(self) -> list[str]:
        return [name for name in self.sets if name not in (ID_VAL, ID_TEST)]


def scores_of(set_logits: SetLogits, score_name: str) -> np.ndarray:
    """OOD scores (float64) of one set under one score function at its default temperature."""
    return SCORES[score_name](torch.from_numpy(set_logits.logits)).double().numpy()


def _cache_key(weights_hash: str, preprocessing: Preprocessing, precision: str, sets: dict[str, list[Sample]]) -> str:
    """Everything the logits depend on: new weights, preprocessing, precision or images miss the cache."""
    parts = {
        "weights": weights_hash,
        "preprocessing": preprocessing.model_dump(mode="json"),
        "precision": precision,
        "sets": {name: fingerprint(samples) for name, samples in sets.items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a file object, so numpy does not append ".npz" to the temp name
        np.savez(handle, **arrays)


def run_logits(config: TrainConfig) -> RunLogits:
    """Logits of the run's best weights on every assessment set (cached per :func:`_cache_key`)."""
    run_dir = config.output_dir
    weights_hash = sha256_file(run_dir / BEST_WEIGHTS)
    sets = assessment_sets(config)
    device = resolve_device(config.device)
    precision = default_precision(device, config.bf16)
    preprocessing = preprocessing_of(config.data.transforms)
    key = _cache_key(weights_hash, preprocessing, precision, sets)
    cache_path = run_dir / CACHE
    if cache_path.is_file():
        with np.load(cache_path) as cached:
            if str(cached["key"]) == key:
                logits = {n: SetLogits(cached[f"{n}.logits"], cached[f"{n}.labels"]) for n in sets}
                return RunLogits(logits, weights_hash, precision)
    model = build_network(config.architecture, len(load_experiment_data(config.data).class_names))
    model.load_state_dict(load_best_weights(run_dir))
    logits = {
        name: collect_logits(
            model, samples, preprocessing, device, precision, config.evaluation.batch_size, config.data.num_workers
        )
        for name, samples in sets.items()
    }
    arrays = {"key": np.array(key)}
    for name, set_logits in logits.items():
        arrays[f"{name}.logits"] = set_logits.logits
        arrays[f"{name}.labels"] = set_logits.labels
    atomic_write(cache_path, lambda tmp: _save_npz(tmp, arrays))
    return RunLogits(logits, weights_hash, precision)
