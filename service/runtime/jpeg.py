"""The fast path for the common upload: a plain JPEG decoded by torchvision, on the model's GPU if any.

PIL (``service.runtime.decoding``) is the reference decoder, and the thresholds were calibrated on what it
produces. torchvision's ``decode_jpeg`` uses the same libjpeg-turbo on the CPU, so for the JPEGs
taken here its pixels equal PIL's bit for bit, and it skips the PIL image and its copy into a
tensor (``benchmarks/decode_bench.py`` measures the gain). On a GPU it decodes with nvjpeg and
the resize runs there too, so no CPU thread touches the pixels; nvjpeg's IDCT and the GPU's float
resize may differ from the CPU's by a few grey levels (``benchmarks/gpu_check.sh`` measures it).

Only *plain* JPEGs are taken: YCbCr or greyscale (CMYK converts differently in the two libraries)
and no EXIF rotation (torchvision applies it on the CPU only). Everything else, and any decode
failure, returns ``None`` and the caller decodes with PIL, which also words the client error
(truncated, corrupt...). Size limits are checked before either decoder runs (``open_image``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

_EXIF_ORIENTATION = 0x0112
_PLAIN_MODES = ("RGB", "L")

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here); they
# still ship, and tests/service/test_jpeg.py pins their output. Do not warn on every request.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


def is_plain_jpeg(image: Image.Image) -> bool:
    """Whether ``image`` (opened, not yet decoded) is a JPEG torchvision decodes exactly as PIL does."""
    if image.format != "JPEG" or image.mode not in _PLAIN_MODES:
        return False
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # malformed EXIF: let PIL decide what it means
        return False


def decode_plain_jpeg(data: bytes, device: torch.device) -> Tensor | None:
    """``data`` as a uint8 RGB tensor (3, H, W) on ``device``, or ``None`` if the decoder refused it."""
    try:
        return decode_jpeg(_encoded(data), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def decode_plain_jpegs(datas: Sequence[bytes], device: torch.device) -> list[Tensor | None]:
    """Several plain JPEGs in one decoder call (on a GPU, nvjpeg's batched decode), each as
    :func:`decode_plain_jpeg` gives it. If the decoder refuses the batch, the images are decoded one
    by one, so that one bad file costs only its own ``None``."""
    if not datas:
        return []
    try:
        return list(decode_jpeg([_encoded(data) for data in datas], mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [decode_plain_jpeg(data, device) for data in datas]


def _encoded(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
