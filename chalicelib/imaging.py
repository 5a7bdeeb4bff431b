"""A decoded RGB picture -> the model's input array, per the archive's preprocessing.

Pillow does all of the work; torchvision is never imported at run time (it
costs about 0.9 s of cold start, and PyPI's build is tied to CUDA torch, which
a Lambda layer cannot carry). The steps reproduce torchvision's
``Resize(short side)`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize`` on PIL
images exactly, rounding included, so a model trained with those transforms
sees the same numbers here (``tests/test_imaging.py`` holds that to 1e-5).
Bytes become that picture in ``decoding``.

The result is a float32 numpy array in CHW order; turning it into a tensor is
the classifier's business, which keeps this module free of torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from chalicelib.errors import ModelUnavailable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REDUCING_GAP = 3.0
# Past this aspect ratio the resize covers only the crop's region (see to_model_input).
EXACT_RESIZE_MAX_ASPECT = 16

INTERPOLATIONS: Mapping[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input; the defaults are the fast.ai tutorial's."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Preprocessing:
        """Read ``manifest["preprocessing"]``; an archive without one gets the defaults."""
        section = manifest.get("preprocessing", {})
        if not isinstance(section, Mapping):
            raise _bad_manifest("preprocessing", "an object", section)
        unknown = set(section) - {"resize", "crop", "interpolation", "mean", "std"}
        if unknown:
            raise ModelUnavailable(
                f"manifest.json preprocessing has unknown keys {sorted(unknown)}; expected "
                "resize, crop, interpolation, mean, std."
            )
        defaults = cls()
        resize = _size(section, "resize", defaults.resize)
        crop = _size(section, "crop", defaults.crop)
        if crop > resize:
            raise ModelUnavailable(
                f"manifest.json preprocessing crops {crop} pixels out of a {resize}-pixel "
                "resize; crop must not exceed resize."
            )
        interpolation = section.get("interpolation", defaults.interpolation)
        if interpolation not in INTERPOLATIONS:
            raise _bad_manifest("interpolation", f"one of {sorted(INTERPOLATIONS)}", interpolation)
        return cls(
            resize=resize,
            crop=crop,
            interpolation=interpolation,
            mean=_triple(section, "mean", defaults.mean, positive=False),
            std=_triple(section, "std", defaults.std, positive=True),
        )


def to_model_input(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize the short side, centre-crop, scale to [0, 1] and normalise: CHW float32.

    A picture longer than ``EXACT_RESIZE_MAX_ASPECT`` times its width (or the
    other way round) is resized only over the source region the centre crop
    keeps (Pillow's ``box``): the cost of the crop alone, where resizing the
    whole strip would cost its full upscaled length. That region's pixels
    differ from torchvision's by at most 1/255 on a few of them (floating
    point in the filter's centres), so ordinary pictures take the exact path.
    The array is a CHW view of HWC (channels-last) memory: no transposing
    copy, and channels-last is the layout the frozen model runs fastest on.
    """
    cropped = _resized_centre_crop(image, preprocessing)
    pixels = np.asarray(cropped, dtype=np.float32)
    pixels /= 255.0
    pixels -= np.asarray(preprocessing.mean, dtype=np.float32)
    pixels /= np.asarray(preprocessing.std, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


def _resized_centre_crop(image: Image.Image, preprocessing: Preprocessing) -> Image.Image:
    # reducing_gap: shrink by an integer factor first (a cheap box reduce) when the
    # source is over 3x the target; below that it resizes exactly as torchvision.
    width, height = image.size
    resized_width, resized_height = _resized_size(width, height, preprocessing.resize)
    crop = preprocessing.crop
    # round() is Python's half-to-even, exactly as torchvision's center_crop.
    left = round((resized_width - crop) / 2.0)
    top = round((resized_height - crop) / 2.0)
    resample = INTERPOLATIONS[preprocessing.interpolation]
    if max(width, height) <= EXACT_RESIZE_MAX_ASPECT * min(width, height):
        resized = image.resize((resized_width, resized_height), resample, reducing_gap=REDUCING_GAP)
        return resized.crop((left, top, left + crop, top + crop))
    scale_x, scale_y = width / resized_width, height / resized_height
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return image.resize((crop, crop), resample, box=box, reducing_gap=REDUCING_GAP)


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)``: the short side becomes ``size``, the long one is truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _size(section: Mapping[str, Any], name: str, default: int) -> int:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise _bad_manifest(name, "an integer from 1 to 4096", value)
    return value


def _triple(
    section: Mapping[str, Any], name: str, default: tuple[float, float, float], *, positive: bool
) -> tuple[float, float, float]:
    value = section.get(name, default)
    if not (
        isinstance(value, Sequence)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and (not positive or all(v > 0 for v in value))
    ):
        expected = "three positive numbers" if positive else "three numbers"
        raise _bad_manifest(name, expected, value)
    return (float(value[0]), float(value[1]), float(value[2]))


def _bad_manifest(name: str, expected: str, got: object) -> ModelUnavailable:
    return ModelUnavailable(f"manifest.json preprocessing '{name}' must be {expected}, got {got!r}.")
