"""Logits of a trained run on every assessment set, computed once and cached in the run directory.

Evaluation, calibration and export all need the same forward passes (ID validation, ID test, each
OOD set). They share :func:`run_logits`, which caches the arrays in ``<run>/logits.npz`` keyed by
the weights' hash, so re-running a later stage never recomputes them and new weights never reuse
stale ones. Images go through :func:`models.preprocess.eval_transform`, exactly as in the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.bundle import sha256_file
from models.nets import build_network, deployed_logits
from models.preprocess import Preprocessing, eval_transform
from training.checkpoint import BEST_WEIGHTS, load_best_weights
from training.config import TrainConfig
from training.data import ImageDataset, Sample, collate_skipping_bad, list_images
from training.transforms import preprocessing_of
from models.nets import resolve_device
from training.experiment import load_experiment_data

ID_VAL, ID_TEST, FINE = "id_val", "id_test", "fine"
CACHE = "logits.npz"


@dataclass(frozen=True)
class SetLogits:
    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64; -1 for OOD sets


def assessment_sets(config: TrainConfig) -> dict[str, list[Sample]]:
    """``id_val`` (calibration), ``id_test``, ``fine`` (held-out classes) and each named OOD folder."""
    data = load_experiment_data(config.data)
    sets = {ID_VAL: data.val.samples}
    if data.test is not None:
        sets[ID_TEST] = data.test.samples
    if data.fine_ood_test is not None:
        sets[FINE] = [Sample(s.path, -1) for s in data.fine_ood_test.samples]
    rng = np.random.default_rng(config.seed)
    for name, root in config.evaluation.ood_sets.items():
        if name in sets:
            raise ValueError(f"OOD set name {name!r} is reserved; choose another")
        paths = list_images(Path(root))
        limit = config.evaluation.max_images_per_set
        if limit is not None and len(paths) > limit:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
        sets[name] = [Sample(p, -1) for p in paths]
    return sets


def collect_logits(
    model: torch.nn.Module, samples: list[Sample], preprocessing: Preprocessing, device: torch.device,
    batch_size: int, workers: int,
) -> SetLogits:
    dataset = ImageDataset(samples, eval_transform(preprocessing))
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
        logits.append(deployed_logits(model, images))
        labels.append(targets)
    num_classes = model.num_classes
    return SetLogits(
        torch.cat(logits).numpy() if logits else np.zeros((0, num_classes), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
    )


def run_logits(config: TrainConfig) -> dict[str, SetLogits]:
    """Logits of the run's best weights on every assessment set (cached per weights hash)."""
    run_dir = config.output_dir
    weights_hash = sha256_file(run_dir / BEST_WEIGHTS)
    sets = assessment_sets(config)
    cache_path = run_dir / CACHE
    if cache_path.is_file():
        with np.load(cache_path) as cached:
            if str(cached["weights_sha256"]) == weights_hash and all(f"{n}.logits" in cached for n in sets):
                return {n: SetLogits(cached[f"{n}.logits"], cached[f"{n}.labels"]) for n in sets}
    data = load_experiment_data(config.data)
    model = build_network(config.architecture, data.num_classes)
    model.load_state_dict(load_best_weights(run_dir))
    device = resolve_device(config.device)
    preprocessing = preprocessing_of(config.data.transforms)
    result = {
        name: collect_logits(
            model, samples, preprocessing, device, config.evaluation.batch_size, config.data.num_workers
        )
        for name, samples in sets.items()
    }
    arrays = {"weights_sha256": np.array(weights_hash)}
    for name, set_logits in result.items():
        arrays[f"{name}.logits"] = set_logits.logits
        arrays[f"{name}.labels"] = set_logits.labels
    np.savez(cache_path, **arrays)
    return result
