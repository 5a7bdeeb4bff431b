"""Image bytes -> RGB picture -> the model's input array.

Pillow does all of the work; torchvision is never imported at run time (it
costs about 0.9 s of cold start, and PyPI's build is tied to CUDA torch, which
a Lambda layer cannot carry). The steps reproduce torchvision's
``Resize(short side)`` / ``CenterCrop`` / ``ToTensor`` / ``Normalize`` on PIL
images exactly, rounding included, so a model trained with those transforms
sees the same numbers here (``tests/test_imaging.py`` holds that to 1e-5).

The result is a float32 numpy array in CHW order; turning it into a tensor is
the classifier's business, which keeps this module free of torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from chalicelib.errors import ImageTooLarge, ModelUnavailable, UnsupportedImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Formats a browser or camera produces; everything else Pillow can parse
# (PSD, EPS via Ghostscript, ICNS, ...) is attack surface we do not need.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

REDUCING_GAP = 3.0
DRAFT_MARGIN = 2

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


def decode_image(data: bytes, *, max_pixels: int, min_short_side: int | None = None) -> Image.Image:
    """Decode to an upright RGB image, refusing oversized images before decoding them.

    With ``min_short_side`` (the resize target), a JPEG much larger than
    needed is decoded at 1/2, 1/4 or 1/8 scale straight from its DCT
    coefficients (Pillow's ``draft``), keeping the short side at least
    ``DRAFT_MARGIN`` times the target. A 12-megapixel photo then decodes about
    5x faster in a sixteenth of the memory; with a margin of 2 the top-1 class
    of the test photos never changed and no probability moved by 0.02 (bench/).
    """
    with _open(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"The image is {width}x{height} = {width * height:,} pixels; the limit is "
                f"{max_pixels:,} (MAX_IMAGE_PIXELS)."
            )
        try:
            if min_short_side is not None and image.format == "JPEG":
                keep = DRAFT_MARGIN * min_short_side
                image.draft("RGB", (keep, keep))
            return _to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(f"The image is too large to decode safely: {error}") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise _corrupt(error) from error


def _open(data: bytes) -> Image.Image:
    """Read only the header: format, mode and size, no pixels yet."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as error:
        raise UnsupportedImage(
            "The body of the image URL is not an image in a supported format; expected "
            f"{', '.join(ALLOWED_FORMATS)}."
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"The image is too large to decode safely: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _corrupt(error) from error


def _corrupt(error: Exception) -> UnsupportedImage:
    return UnsupportedImage(f"The image is truncated or corrupt and cannot be decoded ({error}).")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels are laid on white, as a viewer shows them."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8 bits by their range, not by clipping.

    Pillow's own ``convert`` clips these to 0..255, which turns a normal
    16-bit photo white. Integer images are scaled from the 16-bit range when
    they fit it (16-bit PNG and TIFF arrive as ``I;16`` or ``I``); float
    images from [0, 1] when they fit it; anything else is stretched from its
    own minimum to maximum.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    elif image.mode != "F" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.nan_to_num((values - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_model_input(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize the short side, centre-crop, scale to [0, 1] and normalise: CHW float32.

    The array is a CHW view of HWC (channels-last) memory: no transposing
    copy, and channels-last is the layout the frozen model runs fastest on.
    """
    resized = _resize_short_side(image, preprocessing.resize, INTERPOLATIONS[preprocessing.interpolation])
    cropped = _center_crop(resized, preprocessing.crop)
    pixels = np.asarray(cropped, dtype=np.float32)
    pixels /= 255.0
    pixels -= np.asarray(preprocessing.mean, dtype=np.float32)
    pixels /= np.asarray(preprocessing.std, dtype=np.float32)
    return pixels.transpose(2, 0, 1)


def _resize_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    # reducing_gap: shrink by an integer factor first (cheap box reduce) when the
    # image is over 3x the target; below that it resizes exactly as torchvision.
    return image.resize(new_size, resample, reducing_gap=REDUCING_GAP)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    # round() is Python's half-to-even, exactly as torchvision's center_crop.
    width, height = image.size
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


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
