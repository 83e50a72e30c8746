"""Tests for training.data.datasets and training.data.transforms on tiny generated images."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2

from models.network.images import MAX_IMAGE_PIXELS
from models.network.preprocess import EvalTransform
from tests.helpers.images import (
    make_image_folder,
    make_list_dataset,
    png_claiming,
    write_corrupt_image,
    write_truncated_jpeg,
)
from training.config import DataConfig, TransformConfig
from training.data.datasets import (
    ImageDataset,
    OutlierPool,
    Sample,
    SplitData,
    collate_skipping_bad,
    fingerprint,
    holdout_split,
    load_split,
    ood_samples,
    read_class_folder,
    read_list_file,
    restrict_to_classes,
)
from training.data.transforms import build_eval_geometry, build_eval_transform, build_train_transform, preprocessing_of

SMALL = TransformConfig(input_size=16, resize=18)


# --------------------------------------------------------------------------- holdout


def test_fgvc_aircraft_split_0_holds_out_the_papers_classes():
    id_classes, ood_classes = holdout_split(100, 90, seed=0)
    assert ood_classes == [9, 21, 36, 44, 47, 64, 67, 83, 87, 96]
    assert id_classes == sorted(set(range(100)) - set(ood_classes))


def test_holdout_leaves_the_global_numpy_rng_alone():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    holdout_split(17, 12, seed=1)
    assert np.random.random() == expected


@pytest.mark.parametrize(
    ("num_id", "message"),
    [(90, "asked for 90 ID classes but the dataset has 80"), (0, "at least 1")],
)
def test_holdout_rejects_impossible_class_counts(num_id, message):
    with pytest.raises(ValueError, match=message):
        holdout_split(80, num_id, seed=0)


def _toy_split() -> SplitData:
    names = ["a", "b", "c", "d", "e"]
    return SplitData([Sample(Path(f"{n}{i}.jpg"), label) for label, n in enumerate(names) for i in range(2)], names)


def test_restrict_to_classes_remaps_in_sorted_order():
    restricted = restrict_to_classes(_toy_split(), [3, 1])
    assert restricted.class_names == ["b", "d"]
    assert [(s.path.name, s.label) for s in restricted.samples] == [
        ("b0.jpg", 0),
        ("b1.jpg", 0),
        ("d0.jpg", 1),
        ("d1.jpg", 1),
    ]


def test_ood_samples_keep_their_original_labels():
    held_out = ood_samples(_toy_split(), [4, 0])
    assert sorted({s.label for s in held_out.samples}) == [0, 4]
    assert len(held_out.samples) == 4
    assert held_out.class_names == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("classes", [[5], [1, 1], []])
def test_restrict_to_classes_rejects_bad_class_lists(classes):
    with pytest.raises(ValueError):
        restrict_to_classes(_toy_split(), classes)


# --------------------------------------------------------------------------- readers


def test_read_class_folder_labels_by_sorted_folder_name(tmp_path):
    make_image_folder(tmp_path / "train", ["zebra", "ant", "moth"], per_class=3)
    data = read_class_folder(tmp_path / "train")
    assert data.class_names == ["ant", "moth", "zebra"]
    assert len(data.samples) == 9
    assert all(data.class_names[s.label] == s.path.parent.name for s in data.samples)


def test_read_class_folder_finds_every_image_extension_case_insensitively(tmp_path):
    make_image_folder(tmp_path, ["cls"], per_class=1)
    source = tmp_path / "cls" / "000.jpg"
    shutil.copy(source, tmp_path / "cls" / "upper.JPEG")
    Image.open(source).save(tmp_path / "cls" / "other.png")
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    names = sorted(s.path.name for s in read_class_folder(tmp_path).samples)
    assert names == ["000.jpg", "other.png", "upper.JPEG"]


def test_read_class_folder_rejects_an_empty_class_folder(tmp_path):
    make_image_folder(tmp_path, ["full"], per_class=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_class_folder(tmp_path)


def test_read_class_folder_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_class_folder(tmp_path / "nowhere")


def test_read_list_file_reads_the_flowers_layout(tmp_path):
    make_list_dataset(tmp_path, ["daffodil", "snowdrop", "iris"], per_split={"train": 3, "val": 1})
    data = read_list_file(tmp_path, "train.txt", "classes.txt")
    assert data.class_names == ["daffodil", "snowdrop", "iris"]
    assert len(data.samples) == 9
    assert all(s.path.is_file() and data.class_names[s.label] == s.path.parent.name for s in data.samples)
    assert len(read_list_file(tmp_path, "val.txt", "classes.txt").samples) == 3


def test_read_list_file_reports_a_missing_image_with_its_line(tmp_path):
    make_list_dataset(tmp_path, ["a", "b"], per_split={"train": 2})
    with (tmp_path / "train.txt").open("a") as handle:
        handle.write("images/a/gone.jpg 0\n")
    with pytest.raises(FileNotFoundError, match=r"train\.txt:5: .*gone\.jpg"):
        read_list_file(tmp_path, "train.txt", "classes.txt")


@pytest.mark.parametrize(
    ("line", "message"),
    [("images/a/train_000.jpg 2", r"label 2 out of range 0\.\.1"), ("images/a/train_000.jpg x", "not an integer")],
)
def test_read_list_file_rejects_bad_labels(tmp_path, line, message):
    make_list_dataset(tmp_path, ["a", "b"], per_split={"train": 1})
    (tmp_path / "bad.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_list_file(tmp_path, "bad.txt", "classes.txt")


def test_load_split_dispatches_on_format(tmp_path):
    make_list_dataset(tmp_path / "list", ["a", "b"], per_split={"train": 2, "val": 1})
    make_image_folder(tmp_path / "folder" / "train", ["a", "b", "c"], per_class=2)
    make_image_folder(tmp_path / "folder" / "val", ["a", "b", "c"], per_class=1)
    listed = DataConfig(
        format="list", root=tmp_path / "list", train="train.txt", val="val.txt", classes_file="classes.txt"
    )
    folders = DataConfig(format="folder", root=tmp_path / "folder")
    assert len(load_split(listed, listed.val).samples) == 2
    assert len(load_split(folders, folders.val).samples) == 3
    with pytest.raises(ValueError, match="not configured"):
        load_split(folders, None)
    with pytest.raises(ValueError, match="classes_file"):
        load_split(listed.model_copy(update={"classes_file": None}), listed.train)


def test_load_split_rejects_folder_splits_with_different_classes(tmp_path):
    make_image_folder(tmp_path / "train", ["a", "b"], per_class=1)
    make_image_folder(tmp_path / "val", ["a", "c"], per_class=1)
    config = DataConfig(format="folder", root=tmp_path)
    with pytest.raises(ValueError, match=r"only in val: \['c'\], only in train: \['b'\]"):
        load_split(config, config.val)


# --------------------------------------------------------------------------- datasets


@pytest.fixture
def damaged_folder(tmp_path) -> SplitData:
    """Two classes of three good images each, plus one corrupt and one truncated file."""
    make_image_folder(tmp_path, ["a", "b"], per_class=3)
    write_corrupt_image(tmp_path / "a" / "corrupt.jpg")
    write_truncated_jpeg(tmp_path / "b" / "truncated.jpg")
    return read_class_folder(tmp_path)


def test_bad_images_are_skipped_counted_and_warned_about(damaged_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="training.data.datasets"):
        dataset = ImageDataset(damaged_folder.samples, build_eval_transform(SMALL))
        loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skipping_bad)
        batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (6, 3, 16, 16)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.skipped == 2
    assert [p.name for p in dataset.bad_files] == ["corrupt.jpg"]
    assert [p.name for p in dataset.failed_files] == ["truncated.jpg"]
    assert "corrupt.jpg" in caplog.text and "truncated.jpg" in caplog.text


def test_images_over_the_services_pixel_limit_are_skipped_from_their_header(tmp_path, caplog):
    make_image_folder(tmp_path, ["a"], per_class=2)
    side = math.isqrt(MAX_IMAGE_PIXELS) + 1  # just over the limit; far under PIL's own bomb limit
    (tmp_path / "a" / "bomb.png").write_bytes(png_claiming(side, side))
    with caplog.at_level(logging.WARNING, logger="training.data.datasets"):
        dataset = ImageDataset(read_class_folder(tmp_path).samples, build_eval_transform(SMALL))
    assert [p.name for p in dataset.bad_files] == ["bomb.png"]
    assert len(dataset) == 2
    assert f"{side}x{side} = {side * side} pixels; the limit is {MAX_IMAGE_PIXELS}" in caplog.text


def test_load_failures_in_worker_processes_reach_the_main_process(damaged_folder):
    dataset = ImageDataset(damaged_folder.samples, build_eval_transform(SMALL))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_skipping_bad)
    assert sum(len(batch[1]) for batch in loader if batch is not None) == 6
    assert [p.name for p in dataset.failed_files] == ["truncated.jpg"]


def test_a_dataset_without_a_readable_image_is_an_error(tmp_path):
    bad = write_corrupt_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the 1 images is readable"):
        ImageDataset([Sample(bad, 0)], build_eval_transform(SMALL))


def test_outlier_pool_is_recursive_unlabelled_and_honours_exclude(tmp_path):
    make_image_folder(tmp_path / "animals", ["cat", "dog"], per_class=2)
    make_image_folder(tmp_path / "plants", ["fern"], per_class=3)
    transform = build_eval_transform(SMALL)
    assert len(OutlierPool(tmp_path, transform)) == 7
    pool = OutlierPool(tmp_path, transform, exclude=["plants", "animals/dog"])
    assert sorted(p.parent.name for p in (s.path for s in pool.samples)) == ["cat", "cat"]
    assert isinstance(pool[0], torch.Tensor) and pool[0].shape == (3, 16, 16)


def test_outlier_pool_rejects_an_unknown_exclude(tmp_path):
    make_image_folder(tmp_path, ["cat"], per_class=1)
    with pytest.raises(ValueError, match=r"'kat' is not a sub-folder.*\['cat'\]"):
        OutlierPool(tmp_path, build_eval_transform(SMALL), exclude=["kat"])


def test_outlier_pool_without_images_names_the_folder(tmp_path):
    (tmp_path / "pool" / "empty").mkdir(parents=True)
    (tmp_path / "pool" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="pool holds no images"):
        OutlierPool(tmp_path / "pool", build_eval_transform(SMALL))


# --------------------------------------------------------------------------- loading


class _RecordingSampler(Sampler[int]):
    def __init__(self, size: int):
        self.size = size
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


# --------------------------------------------------------------------------- transforms


def test_transforms_give_the_configured_shape():
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    config = TransformConfig(input_size=24, resize=28, color_jitter=0.4)
    assert build_eval_transform(config)(image).shape == (3, 24, 24)
    assert build_eval_transform(config)(image).dtype == torch.float32
    for transform in (build_train_transform(config), build_eval_geometry(config)):
        output = transform(image)
        assert output.shape == (3, 24, 24) and output.dtype == torch.uint8


def test_eval_transform_is_the_serving_one():
    image = Image.new("RGB", (40, 32), (10, 220, 90))
    config = TransformConfig(input_size=16, resize=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert preprocessing_of(config).resize == 20
    assert torch.equal(build_eval_transform(config)(image), EvalTransform(preprocessing_of(config))(image))


def test_switched_off_augmentations_are_left_out():
    steps = build_train_transform(TransformConfig(horizontal_flip=False, color_jitter=0.0)).transforms
    assert not any(isinstance(step, (v2.RandomHorizontalFlip, v2.ColorJitter)) for step in steps)
    steps = build_train_transform(TransformConfig(color_jitter=0.3)).transforms
    assert sum(isinstance(step, (v2.RandomHorizontalFlip, v2.ColorJitter)) for step in steps) == 2


def test_train_transform_rejects_an_invalid_crop_scale():
    with pytest.raises(ValueError, match="random_crop_scale"):
        build_train_transform(TransformConfig(random_crop_scale=(0.8, 0.5)))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_labels_and_content_but_not_location(tmp_path):
    make_image_folder(tmp_path / "here", ["a", "b"], per_class=2)
    samples = read_class_folder(tmp_path / "here").samples
    reference = fingerprint(samples)
    shutil.copytree(tmp_path / "here", tmp_path / "moved")
    assert fingerprint(read_class_folder(tmp_path / "moved").samples) == reference
    relabelled = [Sample(s.path, 1 - s.label) if i == 0 else s for i, s in enumerate(samples)]
    assert fingerprint(relabelled) != reference
    with samples[-1].path.open("ab") as handle:
        handle.write(b"\0")
    assert fingerprint(samples) != reference
