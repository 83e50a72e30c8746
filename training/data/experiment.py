"""The data of one experiment: ID splits after the holdout-class split, and the outlier pool.

Training, evaluation and calibration all go through :func:`load_experiment_data`, so the ID
classes, their order and the held-out (fine-grained OOD) classes are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.config import DataConfig, ValidationClasses
from training.data.datasets import SplitData, holdout_split, load_split, ood_samples, restrict_to_classes
from training.data.splits import carve_validation


@dataclass(frozen=True)
class ExperimentData:
    """ID splits remapped to ``0..K-1``; with a holdout split, the held-out classes' test data; with
    validation classes, their training and validation images (original labels)."""

    class_names: list[str]
    id_classes: list[int]  # original indices of the classes trained on, sorted (no validation class)
    ood_classes: list[int]  # original indices of held-out classes (empty without a holdout split)
    train: SplitData
    val: SplitData
    test: SplitData | None
    fine_ood_test: SplitData | None  # test images of the held-out classes
    validation_ood: SplitData | None  # train + val images of the classes left out for validation

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_experiment_data(config: DataConfig) -> ExperimentData:
    train = load_split(config, config.train)
    if config.val_from_train is not None:
        train, val = carve_validation(train, config.val_from_train)
    else:
        val = load_split(config, config.val)
    test = load_split(config, config.test) if config.test else None
    total = len(train.class_names)
    if config.holdout is None:
        id_classes, ood_classes = list(range(total)), []
    else:
        id_classes, ood_classes = holdout_split(total, config.holdout.num_id_classes, config.holdout.seed)
    fine = restrict_to_classes(test, ood_classes) if test is not None and ood_classes else None
    validation_ood = None
    if config.validation_classes is not None:
        id_classes, left_out = left_out_classes(id_classes, config.validation_classes)
        validation_ood = SplitData(
            ood_samples(train, left_out).samples + ood_samples(val, left_out).samples, list(train.class_names)
        )
    return ExperimentData(
        class_names=[train.class_names[c] for c in id_classes],
        id_classes=id_classes,
        ood_classes=ood_classes,
        train=restrict_to_classes(train, id_classes),
        val=restrict_to_classes(val, id_classes),
        test=restrict_to_classes(test, id_classes) if test is not None else None,
        fine_ood_test=fine,
        validation_ood=validation_ood,
    )


def left_out_classes(id_classes: list[int], rule: ValidationClasses) -> tuple[list[int], list[int]]:
    """``(kept, left_out)``, both sorted: ``rule.count`` of ``id_classes`` drawn with ``rule.seed``."""
    rule.check_leaves_two(len(id_classes))
    drawn = np.random.RandomState(rule.seed).choice(len(id_classes), rule.count, replace=False)
    left_out = sorted(id_classes[int(i)] for i in drawn)
    return [c for c in id_classes if c not in left_out], left_out
