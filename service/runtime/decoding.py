"""Untrusted bytes -> one RGB PIL image, or a precise client error saying why not.

Uploads are hostile until proven otherwise, so the checks run cheapest first: byte count, then the
header (format, width x height, checked *before* any pixel is decoded, so a decompression bomb
costs nothing), then a full decode of the first frame (``load()``), which is where truncated and
corrupt files show up. Only formats a camera or browser produces are opened: PIL plugins such as
EPS would hand the bytes to external programs.

What the network sees must match what the thresholds were calibrated on (``models.network.preprocess``
takes RGB images), so every accepted image leaves here upright (EXIF orientation applied) and in
8-bit RGB: transparency is composited on white, 16-bit samples are scaled (not clipped) to 8 bits,
palette / grayscale / CMYK are converted, and multi-frame files (GIF, APNG, TIFF) give their first
frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.network.images import TooManyPixels, check_pixel_count
from service.api.errors import ErrorCode, InvalidInput, PayloadTooLarge

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, filename: str | None = None) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image; raise :class:`InvalidInput` on any problem."""
    return load_image(open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, filename=filename), filename)


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, filename: str | None = None) -> Image.Image:
    """Check the byte count and the header (format, width x height); no pixel is decoded yet.

    Callers that decode the pixels some other way (``service.runtime.jpeg``) still get every size check.
    """
    name = _name(filename)
    if not data:
        raise InvalidInput(ErrorCode.EMPTY_FILE, f"{name} is empty (0 bytes)", file=filename)
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            ErrorCode.FILE_TOO_LARGE, f"{name} has {len(data)} bytes; the limit is {max_bytes}", file=filename
        )
    image = _open(data, name, filename)
    try:
        check_pixel_count(image.size, max_pixels)
    except TooManyPixels as error:
        raise PayloadTooLarge(ErrorCode.TOO_MANY_PIXELS, f"{name} is {error}", file=filename) from None
    return image


def load_image(image: Image.Image, filename: str | None = None) -> Image.Image:
    """Decode an :func:`open_image` result: first frame, EXIF orientation applied, 8-bit RGB."""
    _load_first_frame(image, _name(filename), filename)
    return to_rgb(image)


def _name(filename: str | None) -> str:
    return repr(filename) if filename else "the image"


def _open(data: bytes, name: str, filename: str | None) -> Image.Image:
    """Parse the header only (PIL is lazy): format and size, no pixel data yet."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        formats = ", ".join(ACCEPTED_FORMATS)
        raise InvalidInput(
            ErrorCode.NOT_AN_IMAGE, f"{name} is not an image in a supported format ({formats})", file=filename
        ) from None
    except Exception as error:
        raise _client_error(error, name, filename, ErrorCode.NOT_AN_IMAGE, "has an unreadable image header") from None


def _load_first_frame(image: Image.Image, name: str, filename: str | None) -> None:
    """Decode every pixel of frame 0 now, so damage surfaces here and not inside the model thread."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:
        raise _client_error(error, name, filename, ErrorCode.CORRUPT_IMAGE, "is corrupt") from None


def _client_error(error: Exception, name: str, filename: str | None, code: ErrorCode, problem: str) -> InvalidInput:
    """What PIL raised on untrusted bytes, as the client error it means.

    A malformed file can make a format plugin fail in many ways (``OSError``, ``ValueError``,
    ``KeyError``...): whatever is neither a decompression bomb nor a truncation is ``code``.
    """
    if isinstance(error, Image.DecompressionBombError):
        return PayloadTooLarge(ErrorCode.TOO_MANY_PIXELS, f"{name}: {error}", file=filename)
    if isinstance(error, EOFError) or (isinstance(error, OSError) and "truncated" in str(error).lower()):
        return InvalidInput(
            ErrorCode.TRUNCATED_IMAGE, f"{name} is truncated: the file ends before its image data does", file=filename
        )
    return InvalidInput(code, f"{name} {problem}: {error}", file=filename)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded PIL mode to 8-bit RGB the way a viewer would display it."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit samples at 255 (a white image); scale instead.
        # Mode "I" (32-bit) is how PIL holds 16-bit grayscale from some formats: same range.
        samples = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(samples / 257.0).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
