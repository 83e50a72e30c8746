"""The evaluation preprocessing equals torchvision's transforms bit for bit, on every input it takes.

torchvision's ``v2`` pipeline is the specification here: calibration and the service used it
before ``models.network.preprocess`` called the kernels directly, so bundles calibrated then must see
the same pixels now.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models.network.preprocess import EvalGeometry, EvalTransform, Normalization, Preprocessing

PREPROCESSING = Preprocessing(input_size=24, resize=28, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def reference_geometry(preprocessing: Preprocessing) -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), v2.Resize(preprocessing.resize, antialias=True), v2.CenterCrop(preprocessing.input_size)]
    )


def reference_normalization(preprocessing: Preprocessing) -> v2.Compose:
    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(preprocessing.mean), list(preprocessing.std))]
    )


def random_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("size", [(40, 32), (31, 57), (20, 18), (28, 28)])
def test_the_geometry_is_torchvisions_on_pil_images_and_tensors(size: tuple[int, int]):
    image = random_image(*size, seed=sum(size))
    expected = reference_geometry(PREPROCESSING)(image)
    assert torch.equal(EvalGeometry(PREPROCESSING)(image), expected)
    assert torch.equal(EvalGeometry(PREPROCESSING)(v2.functional.pil_to_tensor(image)), expected)
    assert expected.shape == (3, 24, 24)


def test_the_normalization_is_torchvisions_on_images_and_batches():
    batch = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = reference_normalization(PREPROCESSING)(batch)
    normalize = Normalization(PREPROCESSING)
    assert torch.equal(normalize(batch), expected)
    assert torch.equal(normalize(batch[1]), expected[1])
    assert torch.equal(normalize(batch), expected)  # again, with the constants it keeps


def test_the_normalization_refuses_float_input():
    with pytest.raises(TypeError, match="uint8"):
        Normalization(PREPROCESSING)(torch.zeros(3, 24, 24))


def test_the_eval_transform_pickles_for_data_loader_workers():
    image = random_image(33, 29, seed=5)
    transform = EvalTransform(PREPROCESSING)
    expected = reference_normalization(PREPROCESSING)(reference_geometry(PREPROCESSING)(image))
    assert torch.equal(transform(image), expected)
    assert torch.equal(pickle.loads(pickle.dumps(transform))(image), expected)
