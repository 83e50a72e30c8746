"""The pixel limit every image must pass before its pixels are decoded, in training and serving.

A compressed file of a few kilobytes can announce tens of thousands of pixels a side (a
decompression bomb); its header tells the size, so the check costs nothing when it runs between
opening the file (``PIL.Image.open`` reads the header only) and decoding it. The service applies
its configured limit (``MIXOE_MAX_IMAGE_PIXELS``, by default :data:`MAX_IMAGE_PIXELS`) to uploads;
training applies :data:`MAX_IMAGE_PIXELS` to dataset files, skipping those above it.
"""

from __future__ import annotations

MAX_IMAGE_PIXELS = 50_000_000
"""Most pixels (width x height) in one image: a 50-megapixel photo, decoded as 8-bit RGB, is 150 MB."""


class TooManyPixels(ValueError):
    """An image whose header announces more pixels than the limit."""


def check_pixel_count(size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`TooManyPixels` when ``size`` (width, height) holds more than ``max_pixels`` pixels."""
    width, height = size
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} = {width * height} pixels; the limit is {max_pixels}")
