"""The training data layer: read splits, hold classes out, load images robustly, fingerprint.

Two on-disk layouts are read (see :class:`training.config.DataConfig`): class folders
(``<split>/<class>/<image>``, classes in sorted folder order, as torchvision's ``ImageFolder``)
and list files (``relative_path label`` lines plus a class-names file, as Oxford Flowers ships).

The MixOE paper's fine-grained OOD protocol keeps ``K`` of a dataset's ``N`` classes as
in-distribution and holds the rest out as OOD: :func:`holdout_split` reproduces its choice exactly,
:func:`restrict_to_classes` relabels the ID classes ``0..K-1`` in sorted order, and
:func:`ood_samples` gathers the held-out ones.

A real dataset always has a few broken files. :class:`ImageDataset` skips them instead of
crashing a run hours in, and counts what it skipped (see its docstring).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler, default_collate

from models.network.images import TooManyPixels, check_pixel_count
from training.config import DataConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DATA_FORMATS = ("folder", "list")

# What PIL raises for files that are not images, are truncated, or are decompression bombs; and
# TooManyPixels (a ValueError) for images over the pixel limit.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Transform = Callable[[Image.Image], Tensor]


@dataclass
class Sample:
    """One labelled image file."""

    path: Path
    label: int


@dataclass
class SplitData:
    """A split's samples and the class names their labels index."""

    samples: list[Sample]
    class_names: list[str]


# --------------------------------------------------------------------------- holdout


def holdout_split(num_classes: int, num_id: int, seed: int) -> tuple[list[int], list[int]]:
    """``(id_classes, ood_classes)``, both sorted, as the MixOE paper draws split ``seed``.

    The paper's call is ``numpy.random.RandomState(seed).choice(range(N), K, replace=False)``;
    a private ``RandomState`` keeps the global numpy RNG untouched.
    """
    if num_id < 1:
        raise ValueError(f"asked for {num_id} ID classes; at least 1 is needed")
    if num_id > num_classes:
        raise ValueError(f"asked for {num_id} ID classes but the dataset has {num_classes}")
    chosen = np.random.RandomState(seed).choice(range(num_classes), num_id, replace=False)
    id_classes = sorted(int(c) for c in chosen)
    kept = set(id_classes)
    return id_classes, [c for c in range(num_classes) if c not in kept]


def _checked_classes(data: SplitData, classes: Sequence[int]) -> list[int]:
    """``classes`` sorted, after checking they are distinct valid labels of ``data``."""
    if not classes:
        raise ValueError("no classes given")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes contain duplicates: {list(classes)}")
    invalid = [c for c in classes if not 0 <= c < len(data.class_names)]
    if invalid:
        raise ValueError(f"classes {invalid} out of range 0..{len(data.class_names) - 1}")
    return sorted(classes)


def restrict_to_classes(data: SplitData, classes: Sequence[int]) -> SplitData:
    """Keep the samples of ``classes``, relabelled ``0..len(classes)-1`` in sorted class order."""
    kept = _checked_classes(data, classes)
    new_label = {old: new for new, old in enumerate(kept)}
    samples = [Sample(s.path, new_label[s.label]) for s in data.samples if s.label in new_label]
    return SplitData(samples, [data.class_names[c] for c in kept])


def ood_samples(data: SplitData, ood_classes: Sequence[int]) -> SplitData:
    """The held-out classes' samples, **keeping their original labels** and all class names.

    OOD images have no label in the ID model's space; keeping the dataset's own labels (which
    still index ``class_names``) lets reports break results down by held-out species.
    """
    kept = set(_checked_classes(data, ood_classes))
    return SplitData([s for s in data.samples if s.label in kept], list(data.class_names))


# --------------------------------------------------------------------------- readers


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(directory: Path) -> list[Path]:
    """Image files anywhere under ``directory``, sorted; hidden folders and files are left out.

    Symlinked folders are followed, since subsets of datasets are often assembled from links.
    """
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    found = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        found += [
            Path(current, f) for f in files if not _is_hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def _class_dirs(directory: Path) -> list[Path]:
    """The non-hidden sub-folders of ``directory``, sorted by name: one per class."""
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    dirs = sorted((d for d in directory.iterdir() if d.is_dir() and not _is_hidden(d.name)), key=lambda d: d.name)
    if not dirs:
        raise ValueError(f"{directory} has no class sub-folders (expected {directory}/<class>/<image>)")
    return dirs


def read_class_folder(directory: Path) -> SplitData:
    """``directory/<class>/<image>`` (images may sit deeper) -> samples labelled by sorted class.

    A class folder without images is an error rather than a silently missing class, which would
    shift every later label.
    """
    samples: list[Sample] = []
    class_dirs = _class_dirs(Path(directory))
    for label, class_dir in enumerate(class_dirs):
        files = list_images(class_dir)
        if not files:
            valid = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"class folder {class_dir} holds no images (looked for {valid})")
        samples += [Sample(path, label) for path in files]
    return SplitData(samples, [d.name for d in class_dirs])


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"classes file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"classes file {path} lists no classes")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"classes file {path} repeats {duplicates}")
    return names


def read_list_file(root: Path, list_file: str, classes_file: str) -> SplitData:
    """Read ``root/list_file`` (``relative_path label`` lines, paths relative to ``root``).

    Class ``i`` is named by line ``i`` of ``root/classes_file``. Every problem names the file and
    line; missing images are collected and reported together so one run shows them all.
    """
    root = Path(root)
    classes_path = root / classes_file
    class_names = _read_class_names(classes_path)
    list_path = root / list_file
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path}")
    samples: list[Sample] = []
    missing: list[str] = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_path}:{number}"
        parts = line.strip().rsplit(maxsplit=1)  # the path may contain spaces, the label cannot
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'relative_path label', got {line!r}")
        relative, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{where}: label {label_text!r} is not an integer") from None
        if not 0 <= label < len(class_names):
            raise ValueError(
                f"{where}: label {label} out of range 0..{len(class_names) - 1} "
                f"({len(class_names)} classes in {classes_path})"
            )
        path = root / relative
        if not path.is_file():
            missing.append(f"{where}: {path}")
        samples.append(Sample(path, label))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {list_path} do not exist, e.g. " + "; ".join(missing[:5])
        )
    if not samples:
        raise ValueError(f"list file {list_path} lists no images")
    return SplitData(samples, class_names)


def load_split(config: DataConfig, split: str | None) -> SplitData:
    """Read one split, ``split`` being the value of ``config.train``, ``config.val`` or ``config.test``.

    For class folders every split must have the training split's classes, or labels would not
    mean the same thing across splits.
    """
    if split is None:
        raise ValueError("this split is not configured (its setting in the data section is null)")
    if config.format == "folder":
        data = read_class_folder(config.root / split)
        if split != config.train:
            train_names = [d.name for d in _class_dirs(config.root / config.train)]
            if data.class_names != train_names:
                raise ValueError(
                    f"classes of {config.root / split} differ from those of {config.root / config.train}: "
                    f"only in {split}: {sorted(set(data.class_names) - set(train_names))}, "
                    f"only in {config.train}: {sorted(set(train_names) - set(data.class_names))}"
                )
        return data
    if config.format == "list":
        if config.classes_file is None:
            raise ValueError("data format 'list' needs data.classes_file (one class name per line)")
        return read_list_file(config.root, split, config.classes_file)
    raise ValueError(f"Unknown data format {config.format!r}. Supported: {', '.join(DATA_FORMATS)}.")


# --------------------------------------------------------------------------- datasets


def _open_checked(path: Path) -> Image.Image:
    """``PIL.Image.open`` (the header only), refusing images over the pixel limit the service
    applies (:class:`TooManyPixels`) before a pixel is decoded."""
    image = Image.open(path)
    try:
        check_pixel_count(image.size)
    except TooManyPixels:
        image.close()
        raise
    return image


def _header_problem(path: Path) -> str | None:
    """Why PIL cannot even identify ``path`` as an image within the pixel limit, or ``None``. Reads the header only."""
    try:
        with _open_checked(path) as image:
            width, height = image.size
    except _UNREADABLE as error:
        return f"{type(error).__name__}: {error}"
    return None if width > 0 and height > 0 else "zero-sized image"


class ImageDataset(Dataset):
    """``(samples, transform)`` -> ``(image_tensor, label)``, skipping unreadable images.

    Skipping happens in two stages, because a full decode of every file up front would cost as
    much as an epoch:

    1. At construction a cheap header check (``PIL.Image.open``, run over a thread pool) drops
       files that are not images at all: zero bytes, garbage, unknown formats, decompression
       bombs. They are listed in ``bad_files`` and reported in one logged warning.
    2. Damage past the header (a truncated JPEG) only shows when decoding. ``__getitem__`` then
       returns ``None`` instead of raising; :func:`collate_skipping_bad` drops those markers from
       the batch (so a batch may come out smaller than ``batch_size``). The failure is logged once
       per file and recorded in a shared-memory flag per sample, which DataLoader worker
       processes write to, so the main process sees it in ``failed_files``.

    ``skipped`` is the number of distinct files dropped by either stage so far.
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform):
        if not samples:
            raise ValueError("no samples given")
        paths = [s.path for s in samples]
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            problems = list(pool.map(_header_problem, paths))
        self.samples = [s for s, problem in zip(samples, problems) if problem is None]
        self.bad_files = [s.path for s, problem in zip(samples, problems) if problem is not None]
        self.transform = transform
        if self.bad_files:
            reasons = [f"{path} ({why})" for path, why in zip(paths, problems) if why is not None]
            more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
            logger.warning(
                "Skipping %d unreadable image(s) out of %d: %s%s",
                len(reasons),
                len(samples),
                "; ".join(reasons[:5]),
                more,
            )
        if not self.samples:
            raise ValueError(f"none of the {len(samples)} images is readable, e.g. {self.bad_files[0]}")
        self._failed = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def failed_files(self) -> list[Path]:
        """Files that passed the header check but failed to decode when loaded."""
        return [self.samples[i].path for i in self._failed.nonzero().flatten().tolist()]

    @property
    def skipped(self) -> int:
        """Distinct files left out so far: found bad at construction or failed at load time."""
        return len(self.bad_files) + int(self._failed.sum())

    def load_image(self, index: int) -> Image.Image | None:
        """Decode sample ``index`` as RGB, or ``None`` (logged once, recorded) if it is unreadable."""
        path = self.samples[index].path
        try:
            with _open_checked(path) as image:
                # Upright as the photographer saw it, exactly as the service decodes uploads.
                return ImageOps.exif_transpose(image).convert("RGB")
        except _UNREADABLE as error:
            if not self._failed[index]:
                self._failed[index] = 1
                logger.warning("Skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
            return None

    def transformed(self, key: int | tuple[int, int]) -> Tensor | None:
        """Load and transform one image; ``key`` is an index or ``(index, seed)`` from :class:`SeededItems`.

        With a seed, the random augmentation of an image depends on that seed alone, not on which
        worker process loads it or what it loaded before.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.load_image(index)
        if image is None:
            return None
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            return self.transform(image)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int] | None:
        image = self.transformed(key)
        index = key[0] if isinstance(key, tuple) else key
        return None if image is None else (image, self.samples[index].label)


def outlier_files(root: Path, exclude: Sequence[str] = ()) -> list[Path]:
    """Every image under ``root`` (recursively) outside the ``exclude`` sub-folders.

    ``exclude`` names sub-folders of ``root`` (paths relative to it, e.g. ``"dogs"`` or
    ``"train/dogs"``) to leave out, typically classes that overlap the ID data. A name that is not
    a sub-folder is an error, since a typo would otherwise silently keep the overlap.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"outlier folder not found: {root}")
    excluded = []
    for name in exclude:
        folder = root / name
        if not folder.is_dir():
            present = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
            raise ValueError(f"exclude entry {name!r} is not a sub-folder of {root}; its sub-folders: {present}")
        excluded.append(folder)
    paths = [p for p in list_images(root) if not any(p.is_relative_to(folder) for folder in excluded)]
    if not paths:
        detail = f" outside the excluded {list(exclude)}" if exclude else ""
        raise ValueError(f"outlier folder {root} holds no images{detail}")
    return paths


class OutlierPool(ImageDataset):
    """The images of :func:`outlier_files`, labels ignored: returns image tensors only.

    Unreadable images are skipped exactly as in :class:`ImageDataset`.
    """

    def __init__(self, root: Path, transform: Transform, exclude: Sequence[str] = ()):
        super().__init__([Sample(path, -1) for path in outlier_files(root, exclude)], transform)

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor | None:  # type: ignore[override]
        return self.transformed(key)


class SeededItems(Sampler[tuple[int, int]]):
    """Yield ``(index, seed)`` pairs from a (distributed) sampler: one augmentation seed per item.

    The seed is a function of the run seed, the pass (``set_epoch``) and the index only. So the
    augmentations of a run do not depend on the number of loader workers or processes, a
    resumed epoch replays exactly, and workers can stay alive between epochs.
    """

    def __init__(self, sampler: DistributedSampler, seed: int):
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for index in self.sampler:
            yield index, (base + index) % (2**63)


def collate_skipping_bad(batch: list[Any]) -> Any | None:
    """``default_collate`` over the items that loaded; ``None`` when none of them did.

    The datasets mark unreadable images with ``None`` and count them; this only drops the markers.
    """
    good = [item for item in batch if item is not None]
    return default_collate(good) if good else None


# --------------------------------------------------------------------------- fingerprint


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the sorted ``(relative path, label, file size)`` of ``samples``, as hex.

    Paths are taken relative to the samples' common folder, so moving a dataset keeps its
    fingerprint while relabelling, adding, removing or rewriting (resizing) an image changes it.
    Cheap: it reads no pixels.
    """
    digest = hashlib.sha256()
    if not samples:
        return digest.hexdigest()
    absolute = [s.path.absolute() for s in samples]
    base = Path(os.path.commonpath([p.parent for p in absolute]))
    rows = sorted(
        (path.relative_to(base).as_posix(), s.label, path.stat().st_size) for path, s in zip(absolute, samples)
    )
    for relative, label, size in rows:
        digest.update(f"{relative}\t{label}\t{size}\n".encode())
    return digest.hexdigest()
