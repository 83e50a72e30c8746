"""Logits and features of a trained run on every assessment set, and every registered OOD score of them.

Evaluation, calibration, export and comparison all need the same forward passes (ID training
images for the feature-space scores' fit, ID validation, ID test, each OOD set). They share
:func:`run_logits`, which caches logits and penultimate features in ``<run>/logits.npz`` keyed by
everything they depend on (weights, preprocessing, precision, the images of every set), so a later
stage never recomputes them and a changed input never reuses stale ones. Images go through
:class:`models.network.preprocess.EvalTransform` and :func:`models.network.nets.deployed_outputs`, exactly as in
the service, at the precision the bundle will record.

This module is the one place that scores a set by name, logit and feature scores alike::

    run = run_logits(config)
    for name in SCORES:                             # models.scoring.scores: every registered score
        score = fit_score(config, run, name)        # fitted on run.sets[ID_TRAIN] where needed
        id_scores = score(run.sets[ID_TEST])        # float64, higher = more OOD
        ood = {s: score(run.sets[s]) for s in run.ood_set_names()}
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.contract.bundle import sha256_file
from models.contract.manifest import ScoreSpec
from models.network.nets import Classifier, Precision, build_network, default_precision, deployed_outputs, resolve_device
from models.network.preprocess import EvalTransform, Preprocessing
from models.scoring.feature_scores import FitData
from models.scoring.scores import get_score
from training.config import TrainConfig
from training.data.datasets import ImageDataset, Sample, collate_skipping_bad, fingerprint
from training.data.experiment import load_experiment_data
from training.data.splits import ood_sets
from training.data.transforms import preprocessing_of
from training.fit.checkpoint import BEST_WEIGHTS, atomic_write, load_best_weights

ID_TRAIN, ID_VAL, ID_TEST, FINE = "id_train", "id_val", "id_test", "fine"
VAL_CLASSES = "val_classes"  # the classes left out of training for validation (data.validation_classes)
ID_SETS = (ID_TRAIN, ID_VAL, ID_TEST)
CACHE = "logits.npz"


@dataclass(frozen=True)
class SetLogits:
    """One set's network outputs: logits, penultimate features, labels."""

    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64; -1 for OOD sets
    features: np.ndarray  # (N, D) float32


def assessment_sets(config: TrainConfig) -> dict[str, list[Sample]]:
    """``id_train`` (what feature scores are fitted on, evaluation transform), ``id_val``
    (calibration), ``id_test``, ``fine`` (held-out classes), ``val_classes`` (classes left out for
    validation) and each named OOD set."""
    data = load_experiment_data(config.data)
    sets = {ID_TRAIN: data.train.samples, ID_VAL: data.val.samples}
    if data.test is not None:
        sets[ID_TEST] = data.test.samples
    if data.fine_ood_test is not None:
        sets[FINE] = [Sample(s.path, -1) for s in data.fine_ood_test.samples]
    if data.validation_ood is not None:
        sets[VAL_CLASSES] = [Sample(s.path, -1) for s in data.validation_ood.samples]
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
    model: Classifier, samples: list[Sample], preprocessing: Preprocessing, device: torch.device,
    precision: Precision, batch_size: int, workers: int, description: str = "",
) -> SetLogits:
    """Outputs of ``samples`` at ``precision``; a progress bar on a terminal (stderr), labelled ``description``."""
    dataset = ImageDataset(samples, EvalTransform(preprocessing))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
    )
    cuda = device.type == "cuda"
    model.eval().to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    logits, features, labels = [], [], []
    for batch in tqdm(loader, desc=description, leave=False, disable=not sys.stderr.isatty()):
        if batch is None:
            continue
        images, targets = batch
        batch_logits, batch_features = deployed_outputs(model, images, precision)
        logits.append(batch_logits)
        features.append(batch_features)
        labels.append(targets)
    feature_dim = model.head.in_features
    return SetLogits(
        torch.cat(logits).numpy() if logits else np.zeros((0, model.num_classes), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        torch.cat(features).numpy() if features else np.zeros((0, feature_dim), np.float32),
    )


@dataclass(frozen=True)
class RunLogits:
    """Logits per assessment set, and what they were computed from: which weights, which precision."""

    sets: dict[str, SetLogits]
    weights_sha256: str
    precision: Precision

    def ood_set_names(self) -> list[str]:
        return [name for name in self.sets if name not in ID_SETS]


@dataclass(frozen=True)
class FittedScore:
    """A score with its settings (:class:`models.contract.manifest.ScoreSpec`) and fitted state, ready to
    score any set of the run; the state is what a bundle ships (empty for logit scores)."""

    spec: ScoreSpec
    state: dict[str, torch.Tensor]

    def __call__(self, set_logits: SetLogits) -> np.ndarray:
        """OOD scores (N,) float64 of one set; higher = more OOD."""
        score = get_score(self.spec.name)
        features = torch.from_numpy(set_logits.features) if score.needs_features else None
        logits = torch.from_numpy(set_logits.logits)
        return score.apply(logits, features, self.state, self.spec.temperature, self.spec.k).double().numpy()


def confidences(set_logits: SetLogits) -> np.ndarray:
    """Max softmax probability (N,) at temperature 1, computed in float32 as the service computes
    an answer's ``probability`` (:meth:`models.runtime.Bundle.finish`), returned as float64."""
    return torch.from_numpy(set_logits.logits).softmax(dim=1).amax(dim=1).double().numpy()


def misclassified(set_logits: SetLogits) -> np.ndarray:
    """Whether the top-1 class differs from the label (N,) bool; ID sets only (OOD labels are -1)."""
    if set_logits.labels.size and set_logits.labels.min() < 0:
        raise ValueError("misclassification needs labelled ID images; this set is OOD")
    return set_logits.logits.argmax(axis=1) != set_logits.labels


def scores_of(set_logits: SetLogits, score: str | FittedScore) -> np.ndarray:
    """OOD scores (N,) float64 of one set: a logit score by name (default temperature), or any
    :class:`FittedScore` (a feature score must be fitted first: :func:`fit_score`)."""
    if isinstance(score, FittedScore):
        return score(set_logits)
    if get_score(score).needs_features:
        raise ValueError(f"score {score!r} reads features and must be fitted first: use fit_score(config, run, {score!r})")
    return FittedScore(ScoreSpec.default(score), {})(set_logits)


def score_spec(config: TrainConfig, name: str) -> ScoreSpec:
    """Score ``name`` at its default temperature, with the config's ``evaluation.knn_k`` if it takes a k."""
    k = config.evaluation.knn_k if get_score(name).default_k is not None else None
    return ScoreSpec.default(name, k)


def fit_score(config: TrainConfig, run: RunLogits, score: str | ScoreSpec) -> FittedScore:
    """Score ``score`` (a name, or settings) fitted on the run's ID training features; a seeded
    subsample of ``evaluation.knn_bank_size`` of them for the KNN bank (seed: the run's)."""
    spec = score_spec(config, score) if isinstance(score, str) else score
    train = run.sets[ID_TRAIN]
    data = FitData(
        torch.from_numpy(train.features), torch.from_numpy(train.labels), train.logits.shape[1],
        config.evaluation.knn_bank_size, config.seed,
    )
    return FittedScore(spec, get_score(spec.name).fit(data))


def _cache_key(weights_hash: str, preprocessing: Preprocessing, precision: str, sets: dict[str, list[Sample]]) -> str:
    """Everything the logits depend on: new weights, preprocessing, precision or images miss the cache."""
    parts = {
        "outputs": ["logits", "labels", "features"],
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
    """Logits and features of the run's best weights on every assessment set (cached per
    :func:`_cache_key`)."""
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
                logits = {
                    n: SetLogits(cached[f"{n}.logits"], cached[f"{n}.labels"], cached[f"{n}.features"]) for n in sets
                }
                return RunLogits(logits, weights_hash, precision)
    model = build_network(config.architecture, len(load_experiment_data(config.data).class_names))
    model.load_state_dict(load_best_weights(run_dir))
    logits = {
        name: collect_logits(
            model, samples, preprocessing, device, precision, config.evaluation.batch_size, config.data.num_workers,
            description=name,
        )
        for name, samples in sets.items()
    }
    arrays = {"key": np.array(key)}
    for name, set_logits in logits.items():
        arrays[f"{name}.logits"] = set_logits.logits
        arrays[f"{name}.labels"] = set_logits.labels
        arrays[f"{name}.features"] = set_logits.features
    atomic_write(cache_path, lambda tmp: _save_npz(tmp, arrays))
    return RunLogits(logits, weights_hash, precision)
