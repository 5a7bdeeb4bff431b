"""Decoding: every format and mode to upright RGB, shrunk on the way, hostile files refused first."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from chalicelib.decoding import (
    MAX_JPEG_SCANS,
    STRIP_BYTES,
    EncodedImage,
    _shrink,
    decode,
    decode_image,
    decoding_bytes,
    open_image,
    plan_shrink,
)
from chalicelib.errors import ImageTooLarge, UnsupportedImage


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


def many_scans(data: bytes, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans``."""
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * (scans - data.count(b"\xff\xda")) + data[end:]


def opened(data: bytes, min_short_side: int | None = None) -> EncodedImage:
    image = open_image(data, max_pixels=40_000_000)
    if min_short_side is not None:
        plan_shrink(image, min_short_side)
    return image


def test_a_progressive_jpeg_with_too_many_scans_is_refused_on_its_header() -> None:
    """Each scan is a pass over the whole image, and a repeated one costs 23 bytes."""
    progressive = encode(Image.fromarray(skimage.data.coffee()), "JPEG", progressive=True)

    assert decode_image(many_scans(progressive, MAX_JPEG_SCANS), max_pixels=10**6).size == (600, 400)
    with pytest.raises(UnsupportedImage, match=f"{MAX_JPEG_SCANS + 1} scans"):
        open_image(many_scans(progressive, MAX_JPEG_SCANS + 1), max_pixels=10**6)


def test_an_exif_thumbnail_s_scans_are_not_counted() -> None:
    """The scan count walks the JPEG's segments; a 0xFFDA inside an EXIF payload is not a scan."""
    thumbnail = encode(Image.new("RGB", (8, 8)), "JPEG", progressive=True)
    exif = b"Exif\x00\x00" + thumbnail * (MAX_JPEG_SCANS // 5)
    data = encode(Image.fromarray(skimage.data.coffee()), "JPEG", progressive=True, exif=exif)

    assert decode_image(data, max_pixels=10**6).size == (600, 400)


def test_rle_bmp_is_refused_on_its_header() -> None:
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    pixels = bytes([4, 7]) * 2 + b"\x00\x00" + b"\x00\x01"  # two rows of four, then end of bitmap
    fields = (
        (40, 4),
        (4, 4),
        (2, 4),
        (1, 2),
        (8, 2),
        (1, 4),
        (len(pixels), 4),
        (0, 4),
        (0, 4),
        (256, 4),
        (0, 4),
    )
    info = b"".join(value.to_bytes(size, "little") for value, size in fields)
    offset = 14 + len(info) + len(palette)
    data = b"BM" + (offset + len(pixels)).to_bytes(4, "little") + bytes(4) + offset.to_bytes(4, "little")

    with pytest.raises(UnsupportedImage, match="RLE8-compressed BMP"):
        open_image(data + info + palette + pixels, max_pixels=10**6)


@pytest.mark.parametrize(
    ("options", "size"),
    [({"lossless": True}, (301, 157)), ({"quality": 80}, (301, 157)), ({"exif": b"Exif\x00\x00"}, (64, 48))],
    ids=["lossless VP8L", "lossy VP8", "extended VP8X"],
)
def test_webp_is_sized_from_its_header_without_decoding(
    options: dict[str, object], size: tuple[int, int]
) -> None:
    """Pillow's WebP plugin makes libwebp's decoder, two canvases and all, the moment it opens a file."""
    data = encode(Image.new("RGBA", size, (1, 2, 3, 4)), "WEBP", **options)

    image = open_image(data, max_pixels=10**6)

    assert (image.format, image.size, image.pillow) == ("WEBP", size, None)
    assert decode(image).size == size


def test_a_webp_over_the_pixel_cap_is_refused_before_any_decoder_exists() -> None:
    data = encode(Image.new("RGB", (2000, 1000)), "WEBP", lossless=True)

    with pytest.raises(ImageTooLarge, match="2000x1000"):
        open_image(data, max_pixels=1_999_999)


@pytest.mark.parametrize(
    ("mode", "colour"),
    [("RGBA", (200, 30, 40, 100)), ("P", 7), ("1", 1), ("I;16", 40000), ("LA", (90, 30)), ("F", 0.25)],
)
def test_shrinking_a_strip_at_a_time_equals_one_reduce(mode: str, colour: object) -> None:
    """Rows are converted and averaged in strips so no conversion holds a second full frame."""
    image = Image.new(mode, (2051, 3333), colour)  # type: ignore[arg-type]
    image.paste(Image.new(mode, (700, 900)), (300, 1000))  # an edge inside the picture

    shrunk = _shrink(image, min_short_side=224)
    expected_mode = {"P": "RGB", "1": "L", "I;16": "I"}.get(mode, mode)
    reference = image.convert(expected_mode).reduce(2051 // 448)

    assert shrunk.mode == expected_mode
    assert np.array_equal(np.asarray(shrunk), np.asarray(reference))


def test_a_large_image_is_shrunk_before_it_is_converted() -> None:
    data = encode(Image.new("I;16", (5000, 4000), 30000), "PNG")

    rgb = decode_image(data, max_pixels=40_000_000, min_short_side=224)

    assert rgb.mode == "RGB"
    assert rgb.size == (5000 // 8, 4000 // 8)  # the short side at least twice the target
    assert rgb.getpixel((10, 10)) == (117, 117, 117)


def test_decoding_memory_is_the_frame_for_most_and_four_frames_for_webp() -> None:
    png = opened(encode(Image.new("RGBA", (1000, 800)), "PNG"))
    grey = opened(encode(Image.new("L", (1000, 800)), "PNG"))
    webp = opened(encode(Image.new("RGBA", (1000, 800)), "WEBP", lossless=True))

    assert decoding_bytes(png) == 1000 * 800 * 4 + STRIP_BYTES
    assert decoding_bytes(grey) == 1000 * 800 + STRIP_BYTES
    assert decoding_bytes(webp) == 1000 * 800 * 4 * 4 + STRIP_BYTES


def test_a_jpeg_counts_its_draft_frame_and_a_progressive_one_its_coefficients_too() -> None:
    photo = Image.fromarray(skimage.data.coffee()).resize((4000, 2400))
    baseline = opened(encode(photo, "JPEG"), min_short_side=224)
    progressive = opened(encode(photo, "JPEG", progressive=True), min_short_side=224)

    assert decoding_bytes(baseline) == 1000 * 600 * 4 + STRIP_BYTES  # decoded at 1/4 scale
    # 4:2:0 YCbCr: 1.5 samples a pixel, 16 bits each, for the whole 4000 x 2400 picture.
    assert decoding_bytes(progressive) == 1000 * 600 * 4 + int(4000 * 2400 * 2 * 1.5) + STRIP_BYTES


def test_decoding_releases_the_full_frame() -> None:
    """A batch holds its images until the request ends; the frames must not live that long."""
    image = opened(encode(Image.new("RGB", (3000, 2000), (5, 6, 7)), "PNG"), min_short_side=224)

    decode(image, 224)

    assert image.pillow is None
    assert image.data == b""
