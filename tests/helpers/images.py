"""Tiny generated image datasets for tests: deterministic, offline, a few kilobytes each.

Each class gets its own dominant hue (evenly spaced around the colour wheel) plus pixel noise, so
classes are visually distinct enough for a tiny CNN to separate them in a few steps, while no two
images are identical.
"""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SPLITS = {"train": 4, "val": 2, "test": 2}


def class_colour(index: int, num_classes: int) -> tuple[int, int, int]:
    """The dominant RGB colour of class ``index`` out of ``num_classes``."""
    red, green, blue = colorsys.hsv_to_rgb(index / num_classes, 0.9, 0.9)
    return round(red * 255), round(green * 255), round(blue * 255)


def make_image(colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """An RGB image of ``size`` (width, height): ``colour`` plus uniform noise of +-40."""
    width, height = size
    noise = rng.integers(-40, 41, size=(height, width, 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_image_folder(
    root: Path, class_names: Sequence[str], per_class: int, size: tuple[int, int] = (40, 32), seed: int = 0
) -> list[Path]:
    """Write ``root/<class>/<i>.jpg`` for every class; returns the written paths."""
    rng = np.random.default_rng(seed)
    written = []
    for index, name in enumerate(class_names):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:03d}.jpg"
            make_image(class_colour(index, len(class_names)), size, rng).save(path, quality=90)
            written.append(path)
    return written


def make_list_dataset(
    root: Path,
    class_names: Sequence[str],
    per_split: Mapping[str, int] = DEFAULT_SPLITS,
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
) -> Path:
    """Write the Oxford-Flowers layout under ``root`` and return ``root``.

    ``images/<class>/<split>_<i>.jpg``, ``classes.txt`` (one name per line) and one
    ``<split>.txt`` per split with ``relative_path label`` lines; ``per_split`` gives the images
    per class in each split.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    for split, per_class in per_split.items():
        lines = []
        for label, name in enumerate(class_names):
            folder = root / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                relative = f"images/{name}/{split}_{i:03d}.jpg"
                make_image(class_colour(label, len(class_names)), size, rng).save(root / relative, quality=90)
                lines.append(f"{relative} {label}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def jpeg_bytes(size: tuple[int, int] = (40, 32), seed: int = 0) -> bytes:
    """A valid noisy JPEG, encoded in memory."""
    buffer = io.BytesIO()
    make_image((128, 128, 128), size, np.random.default_rng(seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (40, 32)) -> Path:
    """A JPEG cut in half: the header parses, decoding fails."""
    data = jpeg_bytes(size)
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def write_corrupt_image(path: Path) -> Path:
    """Bytes that no image decoder recognises, under whatever image extension ``path`` has."""
    Path(path).write_bytes(b"this is not an image" + bytes(range(256)))
    return Path(path)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing ``width x height`` RGB pixels, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
