"""Preprocessing: our Pillow + numpy path equals torchvision's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms

from chalicelib.errors import ModelUnavailable
from chalicelib.imaging import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing, to_model_input

DEMO = Preprocessing(resize=224, crop=224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TORCHVISION_MODES = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "lanczos": transforms.InterpolationMode.LANCZOS,
    "box": transforms.InterpolationMode.BOX,
    "hamming": transforms.InterpolationMode.HAMMING,
}


def torchvision_reference(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    pipeline = transforms.Compose(
        [
            transforms.Resize(
                preprocessing.resize, interpolation=TORCHVISION_MODES[preprocessing.interpolation]
            ),
            transforms.CenterCrop(preprocessing.crop),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
    return pipeline(image)


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


# Odd sizes make the centre crop land on .5 and exercise the rounding rule.
SIZES = [None, (301, 457), (457, 301), (225, 225), (1000, 227)]


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preprocessing", [Preprocessing(), DEMO], ids=["fastai-default", "demo-manifest"])
def test_matches_torchvision_on_real_photos(
    name: str, size: tuple[int, int] | None, preprocessing: Preprocessing
) -> None:
    image = photo(name)
    if size is not None:
        image = image.resize(size, Image.Resampling.BILINEAR)

    ours = torch.from_numpy(to_model_input(image, preprocessing))
    reference = torchvision_reference(image, preprocessing)

    assert ours.shape == reference.shape == (3, preprocessing.crop, preprocessing.crop)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_every_interpolation_matches_torchvision(interpolation: str) -> None:
    preprocessing = Preprocessing(resize=200, crop=160, interpolation=interpolation)
    image = photo("chelsea")

    ours = torch.from_numpy(to_model_input(image, preprocessing))

    assert torch.allclose(ours, torchvision_reference(image, preprocessing), atol=1e-5, rtol=0)


def test_output_is_a_float32_chw_view_of_channels_last_memory() -> None:
    array = to_model_input(photo("coffee"), Preprocessing())
    batch = torch.from_numpy(array).unsqueeze(0)

    assert array.dtype == np.float32
    assert array.shape == (3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_manifest_without_preprocessing_gets_the_fastai_defaults() -> None:
    assert Preprocessing.from_manifest({"name": "x"}) == Preprocessing()


def test_manifest_preprocessing_is_read() -> None:
    manifest = {
        "preprocessing": {
            "resize": 224,
            "crop": 224,
            "interpolation": "bicubic",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
    }

    assert Preprocessing.from_manifest(manifest) == DEMO


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"resize": "big"}, "'resize' must be an integer"),
        ({"crop": 0}, "'crop' must be an integer"),
        ({"crop": True}, "'crop' must be an integer"),
        ({"interpolation": "cubic"}, "'interpolation' must be one of"),
        ({"mean": [0.5, 0.5]}, "'mean' must be three numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "'std' must be three positive numbers"),
        ({"std": [0.5, float("nan"), 0.5]}, "'std' must be three positive numbers"),
        ({"size": 224}, "unknown keys ['size']"),
    ],
)
def test_bad_manifest_preprocessing_is_model_unavailable(section: dict[str, object], fragment: str) -> None:
    with pytest.raises(ModelUnavailable) as raised:
        Preprocessing.from_manifest({"preprocessing": section})

    assert fragment in str(raised.value)


@pytest.mark.parametrize("size", [(4_000_000, 1), (1, 4_000_000), (1_000_000, 39)])
def test_an_extreme_aspect_ratio_is_resized_over_the_crop_alone(size: tuple[int, int]) -> None:
    """A 1,000,000 x 39 strip resized whole would be 6,564,102 x 256; 40,000,000 x 1 overflowed."""
    array = to_model_input(Image.new("RGB", size, (200, 100, 50)), Preprocessing())

    assert array.shape == (3, 224, 224)
    assert np.allclose(array[:, 100, 100], (np.array([200, 100, 50]) / 255 - IMAGENET_MEAN) / IMAGENET_STD)
