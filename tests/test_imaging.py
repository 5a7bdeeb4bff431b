"""Preprocessing: our Pillow + numpy path equals torchvision's transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms

from chalicelib.errors import ImageTooLarge, ModelUnavailable, UnsupportedImage
from chalicelib.imaging import INTERPOLATIONS, Preprocessing, decode_image, to_model_input

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


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied() -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(wide, "JPEG", exif=exif.tobytes())

    assert decode_image(data, max_pixels=10_000).size == (20, 40)


def test_transparency_is_laid_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))

    decoded = decode_image(encode(clear, "PNG"), max_pixels=10_000)

    assert decoded.mode == "RGB"
    assert decoded.getpixel((4, 4)) == (255, 255, 255)


def test_greyscale_becomes_rgb() -> None:
    grey = Image.fromarray(skimage.data.camera())

    decoded = decode_image(encode(grey, "PNG"), max_pixels=1_000_000)

    assert decoded.mode == "RGB"
    assert decoded.size == grey.size


def test_pixel_cap_is_enforced_before_decoding() -> None:
    data = encode(Image.new("RGB", (200, 100)), "PNG")

    with pytest.raises(ImageTooLarge, match="200x100"):
        decode_image(data, max_pixels=19_999)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", UnsupportedImage),
        (b"GIF89a" + b"\x00" * 10, UnsupportedImage),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], UnsupportedImage),
        (b"%PDF-1.4\n", UnsupportedImage),
    ],
    ids=["empty", "gif-header-only", "truncated-jpeg", "pdf"],
)
def test_undecodable_bytes_are_unsupported_image(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, max_pixels=10_000_000)


def test_a_format_outside_the_allow_list_is_refused() -> None:
    data = encode(Image.new("RGB", (16, 16)), "PCX")

    with pytest.raises(UnsupportedImage, match="supported format"):
        decode_image(data, max_pixels=10_000)


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


def _mode_samples() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """One small image per mode, saved in a format that keeps the mode, and the RGB it must become."""
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] * 256)
    sixteen = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    thirty_two = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32))
    floating = Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32))
    return {
        "1": (encode(Image.new("1", (8, 8), 1), "PNG"), (255, 255, 255)),
        "L": (encode(Image.new("L", (8, 8), 100), "PNG"), (100, 100, 100)),
        "LA transparent": (encode(Image.new("LA", (8, 8), (0, 0)), "PNG"), (255, 255, 255)),
        "LA opaque": (encode(Image.new("LA", (8, 8), (60, 255)), "PNG"), (60, 60, 60)),
        "P": (encode(palette, "PNG"), (0, 0, 255)),
        "P with transparency (PNG)": (encode(palette, "PNG", transparency=0), (255, 255, 255)),
        "P with transparency (GIF)": (encode(palette, "GIF", transparency=0), (255, 255, 255)),
        "RGBA transparent": (encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), (255, 255, 255)),
        "RGBA half": (encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"), (127, 127, 127)),
        "RGBA WebP": (
            encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "WEBP", lossless=True),
            (255, 255, 255),
        ),
        "CMYK JPEG": (encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        "CMYK TIFF": (encode(Image.new("CMYK", (8, 8), (255, 0, 255, 0)), "TIFF"), (0, 255, 0)),
        "I;16 PNG": (encode(sixteen, "PNG"), (127, 127, 127)),
        "I;16 TIFF": (encode(sixteen, "TIFF"), (127, 127, 127)),
        "I TIFF": (encode(thirty_two, "TIFF"), (255, 255, 255)),
        "F TIFF": (encode(floating, "TIFF"), (64, 64, 64)),
        "BMP": (encode(Image.new("RGB", (8, 8), (1, 2, 3)), "BMP"), (1, 2, 3)),
    }


MODE_SAMPLES = _mode_samples()


@pytest.mark.parametrize("name", list(MODE_SAMPLES))
def test_every_mode_becomes_the_right_rgb(name: str) -> None:
    data, expected = MODE_SAMPLES[name]

    decoded = decode_image(data, max_pixels=10_000)

    assert decoded.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(decoded.getpixel((4, 4)), expected, strict=True)), (
        decoded.getpixel((4, 4))
    )


def test_modes_under_test_cover_the_list_in_the_issue() -> None:
    opened = {Image.open(io.BytesIO(data)).mode for data, _ in MODE_SAMPLES.values()}

    assert {"1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"} <= opened


def test_animated_images_use_their_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)

    assert decode_image(data, max_pixels=10_000).getpixel((8, 8))[0] > 200


def test_a_small_png_that_declares_100_megapixels_is_refused_without_decoding() -> None:
    data = encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True)
    assert len(data) < 20_000

    with pytest.raises(ImageTooLarge, match="10000x10000"):
        decode_image(data, max_pixels=40_000_000)


def test_truncated_images_stay_errors_globally() -> None:
    from PIL import ImageFile

    import chalicelib.imaging  # noqa: F401 - importing must not change Pillow's global

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
