"""Deterministic splits the data itself does not ship: a validation carve-out, a pool split by category.

* :func:`carve_validation` takes a seeded share of each class out of the training split, for data
  without a validation split (a list file without ``val.txt``).
* :func:`split_categories` divides an outlier pool's category folders into the pool that outlier
  exposure trains on, validation outliers and a coarse OOD test set. Splitting *by category*
  keeps the test honest: a model is never scored on rejecting a category it was trained to reject.
* :func:`ood_sets` gathers every OOD evaluation set a run names: folders, list files, and the
  parts of a split pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.config import CategorySplitConfig, OODSetConfig, OutlierConfig, TrainConfig, ValidationCarveOut
from training.data.datasets import Sample, SplitData, list_images, outlier_files

POOL_PARTS = ("train", "val", "test")


def carve_validation(data: SplitData, carve: ValidationCarveOut) -> tuple[SplitData, SplitData]:
    """``(train, val)``: per class, ``round(fraction * n)`` images (at least 1, at most n - 1) go to val.

    Which ones depends on the seed, the class and the class's sorted paths only, not on the order
    of the list file or on the other classes.
    """
    by_class: dict[int, list[Sample]] = {}
    for sample in data.samples:
        by_class.setdefault(sample.label, []).append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, samples in sorted(by_class.items()):
        samples = sorted(samples, key=lambda s: str(s.path))
        if len(samples) < 2:
            raise ValueError(
                f"class {data.class_names[label]!r} has {len(samples)} training image(s): "
                "carving a validation split needs at least 2 per class"
            )
        count = min(len(samples) - 1, max(1, round(carve.fraction * len(samples))))
        chosen = set(np.random.default_rng([carve.seed, label]).permutation(len(samples))[:count].tolist())
        val += [s for i, s in enumerate(samples) if i in chosen]
        train += [s for i, s in enumerate(samples) if i not in chosen]
    return SplitData(train, list(data.class_names)), SplitData(val, list(data.class_names))


def _part_size(fraction: float, total: int, what: str) -> int:
    size = round(fraction * total)
    if fraction > 0 and size == 0:
        raise ValueError(f"{what}_fraction {fraction} of {total} categories is less than one category")
    return size


def split_categories(names: Sequence[str], split: CategorySplitConfig) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}``, disjoint, each sorted, by a seeded permutation."""
    names = sorted(names)
    test = _part_size(split.test_fraction, len(names), "test")
    val = _part_size(split.val_fraction, len(names), "val")
    if test + val >= len(names):
        raise ValueError(f"{len(names)} categories leave none for the training pool after {test} test and {val} val")
    order = [names[i] for i in np.random.RandomState(split.seed).permutation(len(names))]
    return {"test": sorted(order[:test]), "val": sorted(order[test : test + val]), "train": sorted(order[test + val :])}


def pool_categories(config: OutlierConfig) -> dict[str, list[str]]:
    """The pool's category folders (outside ``exclude``) per part; all in ``train`` without a split."""
    root = Path(config.root)
    if not root.is_dir():
        raise FileNotFoundError(f"outlier folder not found: {root}")
    folders = (d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = sorted(d.name for d in folders if d.name not in config.exclude)
    if config.categories is None:
        return {"train": names, "val": [], "test": []}
    return split_categories(names, config.categories)


def pool_exclusions(config: OutlierConfig) -> list[str]:
    """Sub-folders outlier exposure must not see: ``exclude`` plus the split's val and test categories."""
    parts = pool_categories(config)
    return [*config.exclude, *parts["val"], *parts["test"]]


def pool_files(config: OutlierConfig, part: str = "train") -> list[Path]:
    """Images of one part of the pool; ``train`` (what outlier exposure sees) also takes loose files."""
    if part not in POOL_PARTS:
        raise ValueError(f"Invalid pool part {part!r}. Only {', '.join(POOL_PARTS)} are supported.")
    if part == "train":
        return outlier_files(config.root, pool_exclusions(config))
    return [path for name in pool_categories(config)[part] for path in list_images(Path(config.root) / name)]


def _listed_files(spec: OODSetConfig) -> list[Path]:
    """Paths of ``spec.list_file`` (first field of each line; a trailing integer label is dropped)."""
    list_path = spec.root / spec.list_file
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path}")
    paths = []
    for line in list_path.read_text().splitlines():
        parts = line.strip().rsplit(maxsplit=1)
        if not parts:
            continue
        relative = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line.strip()
        paths.append(spec.root / relative)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {list_path} do not exist, e.g. {missing[:3]}")
    categories = {p.relative_to(spec.root).parts[0] for p in paths}
    unknown = sorted(set(spec.exclude) - categories)
    if unknown:
        raise ValueError(f"exclude entries {unknown} are no category (first folder) of the images in {list_path}")
    return [p for p in paths if p.relative_to(spec.root).parts[0] not in spec.exclude]


def ood_set_files(spec: Path | OODSetConfig) -> list[Path]:
    """The images of one OOD set: a folder tree (``Path``), or a folder or list file with exclusions."""
    if isinstance(spec, Path):
        spec = OODSetConfig(root=spec)
    files = outlier_files(spec.root, spec.exclude) if spec.list_file is None else _listed_files(spec)
    if not files:
        raise ValueError(f"OOD set under {spec.root} holds no images")
    return files


def ood_sets(config: TrainConfig) -> dict[str, list[Path]]:
    """Every named OOD set of the run: ``evaluation.ood_sets``, then the split pool's val and test parts."""
    sets = {name: ood_set_files(spec) for name, spec in config.evaluation.ood_sets.items()}
    split = config.outliers.categories if config.outliers is not None else None
    if split is not None:
        for name, part in ((split.test_set, "test"), (split.val_set, "val")):
            files = pool_files(config.outliers, part)
            if not files:
                continue
            if name in sets:
                raise ValueError(f"OOD set name {name!r} is given twice (evaluation.ood_sets and outliers.categories)")
            sets[name] = files
    return sets
