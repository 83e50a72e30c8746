"""The torchvision JPEG path must be invisible: the same crop as PIL, and PIL wherever it is not."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.runtime import Bundle
from service.api.errors import ErrorCode, InvalidInput
from service.runtime.decoding import decode_image, open_image
from service.runtime.batch_loop.inference import stack_on
from service.runtime.jpeg import decode_plain_jpeg, is_plain_jpeg
from service.runtime.predictor import Upload, prepare_image
from service.settings import Settings
from tests.service.helpers import encode, noise_image

CPU = torch.device("cpu")
LIMITS = {"max_bytes": 10**7, "max_pixels": 10**7}


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: compresses like a photo, unlike pure noise or a flat colour."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return exif.tobytes()


PLAIN_JPEGS = {
    "baseline-420": encode(photo((301, 199)), "JPEG", quality=85),
    "444": encode(photo((64, 97), 1), "JPEG", quality=95, subsampling=0),
    "progressive": encode(photo((250, 180), 2), "JPEG", quality=75, progressive=True),
    "greyscale": encode(photo((90, 70), 3).convert("L"), "JPEG", quality=90),
    "tiny": encode(noise_image(4, (9, 7)), "JPEG", quality=60),
    "exif-upright": encode(photo((80, 60), 5), "JPEG", exif=Image.Exif().tobytes()),
}
OTHER_FILES = {
    "exif-rotated": encode(photo((80, 60), 6), "JPEG", exif=rotated_exif()),
    "cmyk": encode(Image.new("CMYK", (40, 30), (0, 200, 255, 10)), "JPEG"),
    "png": encode(photo((50, 40), 7), "PNG"),
    "webp": encode(photo((50, 40), 8), "WEBP", lossless=True),
}


@pytest.mark.parametrize("data", PLAIN_JPEGS.values(), ids=PLAIN_JPEGS.keys())
def test_plain_jpegs_decode_to_the_same_pixels_as_pil(data: bytes) -> None:
    assert is_plain_jpeg(open_image(data, **LIMITS))
    reference = torch.from_numpy(np.array(decode_image(data, **LIMITS))).permute(2, 0, 1)
    decoded = decode_plain_jpeg(data, CPU)
    assert decoded is not None and decoded.dtype == torch.uint8
    assert torch.equal(decoded, reference)


@pytest.mark.parametrize("data", OTHER_FILES.values(), ids=OTHER_FILES.keys())
def test_files_torchvision_would_decode_differently_are_left_to_pil(data: bytes) -> None:
    assert not is_plain_jpeg(open_image(data, **LIMITS))


def test_a_jpeg_the_decoder_refuses_gives_none() -> None:
    data = PLAIN_JPEGS["baseline-420"]
    assert is_plain_jpeg(open_image(data[: len(data) // 2], **LIMITS))  # the header is intact
    assert decode_plain_jpeg(data[: len(data) // 2], CPU) is None


@pytest.mark.parametrize("data", [*PLAIN_JPEGS.values(), *OTHER_FILES.values()], ids=[*PLAIN_JPEGS, *OTHER_FILES])
def test_prepared_crop_equals_the_calibration_pipeline(
    data: bytes, bundle: Bundle, make_settings: Callable[..., Settings]
) -> None:
    """Whatever path an upload takes, the model sees exactly what ``Bundle.preprocess`` produced."""
    crop = prepare_image(Upload("x.jpg", data), bundle, make_settings())
    expected = bundle.pixels(decode_image(data, **LIMITS))
    assert torch.equal(crop, expected)


def test_a_truncated_jpeg_still_gets_the_pil_reason(bundle: Bundle, make_settings: Callable[..., Settings]) -> None:
    data = PLAIN_JPEGS["progressive"]
    with pytest.raises(InvalidInput) as raised:
        prepare_image(Upload("cut.jpg", data[: len(data) * 2 // 3]), bundle, make_settings())
    assert raised.value.code == ErrorCode.TRUNCATED_IMAGE and raised.value.file == "cut.jpg"


@pytest.mark.parametrize(("allowed", "expected"), [(True, "cuda"), (False, "cpu")])
def test_jpegs_decode_on_the_models_gpu_unless_disabled(
    allowed: bool, expected: str, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    devices: list[torch.device] = []

    def record(data: bytes, device: torch.device) -> torch.Tensor:
        devices.append(device)
        return decode_plain_jpeg(data, CPU)  # no GPU here: decode on the CPU, remember where it was sent

    monkeypatch.setattr("service.runtime.predictor.decode_plain_jpeg", record)
    gpu_bundle = SimpleNamespace(
        device=torch.device("cuda", 0), manifest=SimpleNamespace(preprocessing=SimpleNamespace(resize=32)),
        pixels=lambda image: image,
    )
    prepare_image(Upload("x.jpg", PLAIN_JPEGS["tiny"]), gpu_bundle, make_settings(gpu_jpeg_decode=allowed))
    assert [device.type for device in devices] == [expected]


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with flipped bytes, cut short, or with a block of garbage spliced in."""
    damaged = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for _ in range(rng.integers(1, 20)):
            damaged[rng.integers(200, len(damaged))] = rng.integers(256)
    elif kind == 1:
        damaged = damaged[: rng.integers(100, len(damaged))]
    else:
        start = rng.integers(300, len(damaged))
        damaged[start : start + 300] = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    return bytes(damaged)


def test_damaged_jpegs_get_the_same_outcome_as_with_pil(
    bundle: Bundle, make_settings: Callable[..., Settings]
) -> None:
    """Hostile bytes: the fast path answers exactly as PIL would, the same crop or the same error code."""
    rng = np.random.default_rng(0)
    sources = [PLAIN_JPEGS["baseline-420"], PLAIN_JPEGS["progressive"], encode(photo((400, 300), 9), "JPEG")]
    settings = make_settings()

    def outcome(prepare: Callable[[], torch.Tensor]) -> tuple[str, torch.Tensor | None]:
        try:
            return "ok", prepare()
        except InvalidInput as error:
            return error.code, None

    codes = set()
    for index in range(90):
        data = _damaged(sources[index % len(sources)], rng)
        fast, fast_crop = outcome(lambda: prepare_image(Upload("x.jpg", data), bundle, settings))
        pil, pil_crop = outcome(lambda: bundle.pixels(decode_image(data, **LIMITS)))
        assert fast == pil
        assert fast_crop is None or torch.equal(fast_crop, pil_crop)
        codes.add(fast)
    assert {"ok", ErrorCode.TRUNCATED_IMAGE, ErrorCode.CORRUPT_IMAGE} <= codes  # every kind of damage was exercised


def test_a_batch_may_mix_crops_from_both_decoders() -> None:
    """JPEG crops decoded on the GPU and PNG crops decoded by PIL on the CPU share a batch."""
    target = torch.device("meta")  # stands in for the GPU: a device other than the CPU's
    crops = [torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8, device=target)]
    batch = stack_on(target, crops)
    assert batch.device == target and batch.shape == (2, 3, 8, 8) and batch.dtype == torch.uint8
    from_cpu = stack_on(target, crops[:1] * 3)  # a batch wholly on the CPU: stacked there, copied once
    assert from_cpu.device == target and from_cpu.shape == (3, 3, 8, 8) and from_cpu.dtype == torch.uint8
