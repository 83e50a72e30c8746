"""Untrusted bytes -> upright 8-bit RGB, or a precise reason code."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.network.images import MAX_IMAGE_PIXELS
from service.api.errors import ErrorCode, InvalidInput, PayloadTooLarge
from service.runtime.decoding import decode_image
from service.settings import Settings
from tests.helpers.images import png_claiming
from tests.service.helpers import encode, noise_image, solid

LIMITS = {"max_bytes": 10**7, "max_pixels": 10**7}


def decode(data: bytes, **limits: int) -> Image.Image:
    return decode_image(data, **(LIMITS | limits), filename="upload.bin")


def test_exif_orientation_is_applied() -> None:
    # 40x20 landscape: left half blue, right half red; EXIF 6 = "rotate 90 degrees clockwise to view".
    image = solid((255, 0, 0), (40, 20))
    image.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top
    assert bottom[0] > 200 and bottom[2] < 60


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (Image.new("CMYK", (8, 8), (255, 0, 255, 0)), "TIFF", (0, 255, 0)),
        (Image.new("L", (8, 8), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (Image.new("LA", (8, 8), (0, 128)), "PNG", (127, 127, 127)),  # half-transparent black on white
    ],
    ids=["cmyk-jpeg", "cmyk-tiff", "grayscale", "one-bit", "rgba-transparent", "rgba-opaque", "gray-alpha"],
)
def test_modes_convert_to_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    rgb = decode(encode(image, fmt))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((4, 4)) == pytest.approx(expected, abs=2)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_samples_are_scaled_not_clipped(fmt: str) -> None:
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert Image.open(io.BytesIO(encode(sixteen, fmt))).mode.startswith("I")
    rgb = decode(encode(sixteen, fmt))
    assert rgb.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257; PIL's convert would clip to 255


def test_palette_with_and_without_transparency() -> None:
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    assert decode(encode(palette)).getpixel((0, 0)) == (70, 80, 90)
    assert decode(encode(palette, transparency=3)).getpixel((0, 0)) == (255, 255, 255)


def test_multi_frame_gif_uses_the_first_frame() -> None:
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759
    frames = [Image.new("P", (8, 8), index) for index in (1, 2, 0)]
    for frame in frames:
        frame.putpalette(palette)
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 3
    assert decode(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def _truncated_jpeg() -> bytes:
    data = encode(noise_image(0, (200, 150)), "JPEG")
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = encode(noise_image(1, (200, 150)))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "limits", "error", "code"),
    [
        (b"", {}, InvalidInput, ErrorCode.EMPTY_FILE),
        (b"just some text, not pixels", {}, InvalidInput, ErrorCode.NOT_AN_IMAGE),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {}, InvalidInput, ErrorCode.NOT_AN_IMAGE),
        (_truncated_jpeg(), {}, InvalidInput, ErrorCode.TRUNCATED_IMAGE),
        (_truncated_png(), {}, InvalidInput, ErrorCode.TRUNCATED_IMAGE),
        (png_claiming(60_000, 60_000), {}, PayloadTooLarge, ErrorCode.TOO_MANY_PIXELS),  # beyond PIL's own bomb limit
        (png_claiming(5_000, 5_000), {}, PayloadTooLarge, ErrorCode.TOO_MANY_PIXELS),  # beyond ours only
        (encode(Image.new("RGB", (1000, 1000))), {"max_pixels": 500_000}, PayloadTooLarge, ErrorCode.TOO_MANY_PIXELS),
        (encode(solid((1, 2, 3))), {"max_bytes": 50}, PayloadTooLarge, ErrorCode.FILE_TOO_LARGE),
    ],
    ids=["empty", "text", "eps", "truncated-jpeg", "truncated-png", "pil-bomb", "bomb", "real-large", "too-many-bytes"],
)
def test_bad_bytes_raise_their_reason(
    data: bytes, limits: dict[str, int], error: type[Exception], code: ErrorCode
) -> None:
    with pytest.raises(error) as raised:
        decode(data, **limits)
    assert raised.value.code is code  # type: ignore[attr-defined]
    assert raised.value.file == "upload.bin"  # type: ignore[attr-defined]


def test_bomb_is_refused_from_its_header_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pixel count is checked before any pixel is decoded."""

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("load() must not run for an oversized image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(PayloadTooLarge):
        decode(png_claiming(5_000, 5_000))


def test_the_default_limit_is_the_one_training_applies() -> None:
    """What training skips (``models.network.images``) is what the service refuses by default."""
    side = math.isqrt(MAX_IMAGE_PIXELS) + 1
    with pytest.raises(PayloadTooLarge, match=f"the limit is {MAX_IMAGE_PIXELS}"):
        decode(png_claiming(side, side), max_pixels=Settings().max_image_pixels)
