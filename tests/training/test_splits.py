"""Splits the data does not ship: the validation carve-out, the pool's category split, OOD sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers.images import make_image_folder, make_list_dataset
from training.config import (
    CategorySplitConfig, DataConfig, OODSetConfig, OutlierConfig, TransformConfig, ValidationCarveOut,
    ValidationClasses,
)
from training.data.datasets import read_list_file
from training.data.experiment import load_experiment_data
from training.data.splits import carve_validation, ood_set_files, pool_exclusions, pool_files, split_categories
from training.data.transforms import build_eval_geometry, build_outlier_transform

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def list_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_list_dataset(tmp_path_factory.mktemp("list"), CLASSES, {"train": 10, "test": 2})


def test_carve_out_is_per_class_disjoint_and_deterministic(list_root: Path) -> None:
    data = read_list_file(list_root, "train.txt", "classes.txt")
    carve = ValidationCarveOut(fraction=0.2, seed=3)
    train, val = carve_validation(data, carve)
    assert sorted(s.label for s in val.samples) == [0, 0, 1, 1, 2, 2]  # 20% of 10, per class
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert sorted(str(s.path) for s in train.samples + val.samples) == sorted(str(s.path) for s in data.samples)
    again_train, again_val = carve_validation(data, carve)
    assert [s.path for s in again_val.samples] == [s.path for s in val.samples]
    reversed_list = type(data)(list(reversed(data.samples)), data.class_names)
    assert {s.path for s in carve_validation(reversed_list, carve)[1].samples} == {s.path for s in val.samples}
    other = carve_validation(data, ValidationCarveOut(fraction=0.2, seed=4))[1]
    assert {s.path for s in other.samples} != {s.path for s in val.samples}


def test_a_list_without_val_txt_gets_its_validation_from_train(list_root: Path) -> None:
    config = DataConfig(format="list", root=list_root, classes_file="classes.txt", train="train.txt", val=None,
                        val_from_train={"fraction": 0.3}, test="test.txt")
    data = load_experiment_data(config)
    assert (len(data.train.samples), len(data.val.samples)) == (21, 9)


def test_validation_classes_leave_training_and_become_validation_ood(list_root: Path) -> None:
    config = DataConfig(format="list", root=list_root, classes_file="classes.txt", train="train.txt", val=None,
                        val_from_train={"fraction": 0.3}, test="test.txt", validation_classes={"count": 1, "seed": 2})
    data = load_experiment_data(config)
    whole = load_experiment_data(config.model_copy(update={"validation_classes": None}))
    [left_out] = [name for name in CLASSES if name not in data.class_names]
    assert len(data.class_names) == 2
    left_out_label = CLASSES.index(left_out)
    assert {s.label for s in data.validation_ood.samples} == {left_out_label}
    # every training and validation image of the left-out class, and none of its test images
    expected = {s.path for s in whole.train.samples + whole.val.samples if s.label == left_out_label}
    assert {s.path for s in data.validation_ood.samples} == expected and len(expected) == 10
    kept = {s.path for s in data.train.samples + data.val.samples + data.test.samples}
    assert not kept & expected
    again = load_experiment_data(config)
    assert again.class_names == data.class_names
    other = {tuple(load_experiment_data(config.model_copy(update={"validation_classes": ValidationClasses(
        count=1, seed=seed)})).class_names) for seed in range(6)}
    assert len(other) > 1, "the seed does not change which class is left out"


def test_validation_classes_must_leave_two_classes_to_train_on(list_root: Path) -> None:
    config = DataConfig(format="list", root=list_root, classes_file="classes.txt", train="train.txt", val=None,
                        val_from_train={"fraction": 0.3}, test="test.txt", validation_classes={"count": 2})
    with pytest.raises(ValueError, match="leaves fewer than 2 of the 3 ID classes"):
        load_experiment_data(config)


def test_with_a_holdout_split_too_many_validation_classes_fail_at_config_time(list_root: Path) -> None:
    with pytest.raises(ValueError, match="count 2 leaves fewer than 2 of the 3 ID classes"):
        DataConfig(root=list_root, holdout={"num_id_classes": 3}, validation_classes={"count": 2})


def test_validation_must_come_from_exactly_one_place(list_root: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of data.val"):
        DataConfig(root=list_root, val="val", val_from_train={"fraction": 0.3})


def test_category_split_is_disjoint_complete_and_seeded() -> None:
    names = [f"cat{i:02d}" for i in range(20)]
    split = CategorySplitConfig(test_fraction=0.3, val_fraction=0.1, seed=5)
    parts = split_categories(names, split)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [12, 2, 6]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == names
    assert split_categories(list(reversed(names)), split) == parts
    assert split_categories(names, split.model_copy(update={"seed": 6}))["test"] != parts["test"]


def test_pool_parts_are_split_by_category(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pool", [f"c{i}" for i in range(6)], per_class=2)
    config = OutlierConfig(root=tmp_path / "pool", exclude=["c0"],
                           categories={"test_fraction": 0.4, "val_fraction": 0.2, "seed": 1})
    folders = {part: {p.parent.name for p in pool_files(config, part)} for part in ("train", "val", "test")}
    assert [len(folders[p]) for p in ("train", "val", "test")] == [2, 1, 2]
    assert set.union(*folders.values()) == {"c1", "c2", "c3", "c4", "c5"}
    assert sum(len(f) for f in folders.values()) == 5  # disjoint, and c0 stays excluded
    assert set(pool_exclusions(config)) == {"c0"} | folders["val"] | folders["test"]


def test_an_ood_list_set_drops_excluded_categories(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "ood", ["keep", "drop"], per_class=2)
    (tmp_path / "ood" / "list.txt").write_text("keep/000.jpg 0\ndrop/000.jpg 1\nkeep/001.jpg\n")
    files = ood_set_files(OODSetConfig(root=tmp_path / "ood", list_file="list.txt", exclude=["drop"]))
    assert [p.relative_to(tmp_path / "ood").as_posix() for p in files] == ["keep/000.jpg", "keep/001.jpg"]
    with pytest.raises(ValueError, match=r"exclude entries \['dorp'\]"):
        ood_set_files(OODSetConfig(root=tmp_path / "ood", list_file="list.txt", exclude=["dorp"]))


def test_resize_center_crop_outliers_keep_the_whole_image() -> None:
    transforms = TransformConfig(input_size=16, resize=16, horizontal_flip=False)
    image = Image.frombytes("RGB", (32, 16), bytes(range(256)) * 6)
    outlier = build_outlier_transform(OutlierConfig(root=Path("."), outlier_resize="resize_center_crop"), transforms)
    assert torch.equal(outlier(image), build_eval_geometry(transforms)(image))
