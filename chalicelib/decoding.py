"""Image bytes -> an upright RGB picture, no larger than the model needs, within a memory budget.

A small file can declare a huge picture, so nothing is ever made at full size
but the decoded frame itself, which no decoder can avoid:

- ``open_image`` reads the header only: an image over the pixel cap, in a
  format outside the allow-list, or needing a decoder that cannot be bounded
  is refused before any pixel is decoded. That is RLE BMP (Pillow decodes it
  in pure Python: tens of seconds for a 26 KB file) and a JPEG of more than
  ``MAX_JPEG_SCANS`` scans (libjpeg passes over the whole image once a scan,
  and a scan can be 23 bytes: a 100 KB file could take twenty seconds). WebP's
  size is read from its header here, because Pillow's WebP plugin makes
  libwebp's decoder, with two full canvases, the moment it opens a file;
- a JPEG is decoded at 1/2, 1/4 or 1/8 scale straight from its DCT
  coefficients (``draft``); any other format is shrunk right after decoding
  (``reduce``, a box average), a strip at a time, so mode conversions
  (palette, 16-bit, alpha) never make a second full-size copy;
- only then is the small picture converted to RGB, laid on white and turned
  upright.

``decoding_bytes`` says how much memory a decode takes at its peak, so the
service can keep a request, and concurrent ones, inside a budget (see
budgets). Every message names the image the way the caller sent it
(``source``).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from chalicelib.errors import ImageTooLarge, UnsupportedImage, first_line

# Formats a browser or camera produces; everything else Pillow can parse
# (PSD, EPS via Ghostscript, ICNS, ...) is attack surface we do not need.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# BMP compression values Pillow decodes in Python (BmpRleDecoder), not in C.
UNBOUNDED_BMP_COMPRESSIONS = {1: "RLE8", 2: "RLE4"}

# Decoding keeps the short side at least this many times the resize target:
# with 2 the top-1 class of the test photos never changed and no probability
# moved by 0.02 (bench/).
SHRINK_MARGIN = 2
# Rows converted and reduced at a time: enough to amortise the calls, small beside a frame.
STRIP_BYTES = 8 * 1024 * 1024
# libwebp's animation decoder (Pillow's only way in) keeps two canvases of its
# own, and the frame is then copied into a bytes object and into Pillow's
# image: four frames at once (measured: 613 MB for 40 megapixels).
WEBP_FRAMES_AT_ONCE = 4
# A progressive JPEG usually has about ten scans; encoders that optimise the
# scan script use a few more.
MAX_JPEG_SCANS = 64
# A progressive JPEG is decoded from a buffer of all its DCT coefficients,
# 16 bits each, whatever the draft scale (measured: 118 MiB at 40 megapixels, 4:2:0).
COEFFICIENT_BYTES = 2

# Bytes per pixel of Pillow's own storage: 8-bit modes take one, 16-bit two,
# and every multi-band, 32-bit or float mode four (RGB included).
_ONE_BYTE_MODES = {"1", "L", "P"}
_TWO_BYTE_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# What each mode becomes before it can be reduced: averaging palette indices
# or 1-bit pixels means nothing, and Pillow cannot reduce 16-bit images.
_REDUCIBLE = {"1": "L", "P": "RGB", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class EncodedImage:
    """An image whose header was read and accepted; no pixel is decoded yet.

    ``pillow`` is Pillow's header-only handle, or None for WebP until
    ``decode`` opens it. ``size`` is the header's; a JPEG decodes smaller
    once ``plan_shrink`` has set its draft scale.
    """

    data: bytes
    format: str
    size: tuple[int, int]
    source: str
    pillow: Image.Image | None

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def decode_image(
    data: bytes, *, max_pixels: int, min_short_side: int | None = None, source: str = "The image"
) -> Image.Image:
    """Decode to an upright RGB image no smaller than needed: ``open_image`` then ``decode``.

    With ``min_short_side`` (the resize target) the picture is shrunk on the
    way, keeping its short side at least ``SHRINK_MARGIN`` times the target.
    """
    image = open_image(data, max_pixels=max_pixels, source=source)
    if min_short_side is not None:
        plan_shrink(image, min_short_side)
    return decode(image, min_short_side)


def open_image(data: bytes, *, max_pixels: int, source: str = "The image") -> EncodedImage:
    """Read only the header; refuse what must not be decoded, before anything is allocated for it."""
    webp_size = _webp_size(data, source)
    if webp_size is not None:
        image = EncodedImage(data=data, format="WEBP", size=webp_size, source=source, pillow=None)
    else:
        with _parsing(source):
            pillow = Image.open(io.BytesIO(data), formats=[f for f in ALLOWED_FORMATS if f != "WEBP"])
        image = EncodedImage(
            data=data, format=str(pillow.format), size=pillow.size, source=source, pillow=pillow
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{source} is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{max_pixels:,} (MAX_IMAGE_PIXELS)."
        )
    _refuse_unbounded_decoders(image)
    return image


def _refuse_unbounded_decoders(image: EncodedImage) -> None:
    if image.pillow is None:
        return
    compression = UNBOUNDED_BMP_COMPRESSIONS.get(image.pillow.info.get("compression", 0))
    if image.format == "BMP" and compression is not None:
        raise UnsupportedImage(
            f"{image.source} is a {compression}-compressed BMP, which is not accepted: it can only be "
            "decoded slowly, in Python; send it as PNG or uncompressed BMP."
        )
    if image.format == "JPEG" and image.pillow.info.get("progressive"):
        scans = _jpeg_scans(image.data)
        if scans > MAX_JPEG_SCANS:
            raise UnsupportedImage(
                f"{image.source} is a progressive JPEG of {scans:,} scans; at most {MAX_JPEG_SCANS} are "
                "decoded (each is a pass over the whole image; encoders write about ten)."
            )


def plan_shrink(image: EncodedImage, min_short_side: int) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``) when it is that much too large.

    This changes ``image.size`` to what ``decode`` will produce, so call it
    before ``decoding_bytes``.
    """
    if image.format == "JPEG" and image.pillow is not None:
        keep = SHRINK_MARGIN * min_short_side
        image.pillow.draft("RGB" if image.pillow.mode != "L" else "L", (keep, keep))


def decoding_bytes(image: EncodedImage) -> int:
    """Memory a ``decode`` of this image needs at its peak, plus one strip for shrinking.

    That is its decoded frame (WebP's four), and for a progressive JPEG the
    buffer of all its coefficients besides.
    """
    pillow = image.pillow
    if pillow is None:
        return image.pixels * 4 * WEBP_FRAMES_AT_ONCE + STRIP_BYTES
    width, height = pillow.size  # after any draft
    frame = width * height * _bytes_per_pixel(pillow.mode)
    if image.format == "JPEG" and pillow.info.get("progressive"):
        frame += image.pixels * COEFFICIENT_BYTES * _jpeg_samples_per_pixel(pillow)
    return frame + STRIP_BYTES


def decode(image: EncodedImage, min_short_side: int | None = None) -> Image.Image:
    """Decode to upright RGB, shrunk (see ``plan_shrink``) before any conversion.

    It consumes ``image``: the full-size frame is released as soon as the
    small picture exists (or with the returned picture, when that is the frame
    itself), not when the caller lets go of ``image``. A batch keeps its images
    until the end of the request, and the memory budget counts a frame only
    while its decode runs.
    """
    with _parsing(image.source):
        pillow = image.pillow or Image.open(io.BytesIO(image.data), formats=["WEBP"])
        pillow.load()
        orientation = _ORIENTATIONS.get(pillow.getexif().get(ExifTags.Base.Orientation, 1))
    shrunk = _shrink(pillow, min_short_side) if min_short_side is not None else pillow
    rgb = _to_rgb(shrunk)
    upright = rgb.transpose(orientation) if orientation is not None else rgb
    image.pillow, image.data = None, b""
    if upright is not pillow:
        pillow.close()
    return upright


@contextmanager
def _parsing(source: str) -> Iterator[None]:
    """Pillow parsing hostile bytes: whatever it raises is the bytes' fault, a 422 (or 413).

    Its plugins raise OSError, SyntaxError, ValueError and EOFError by design,
    and on malformed files also struct.error, IndexError, KeyError, TypeError,
    ZeroDivisionError and the like; none of them may become a 500.
    """
    try:
        yield
    except UnidentifiedImageError as error:
        raise UnsupportedImage(
            f"{source} is not an image in a supported format; expected {', '.join(ALLOWED_FORMATS)}."
        ) from error
    except (Image.DecompressionBombError, MemoryError) as error:
        raise ImageTooLarge(f"{source} is too large to decode safely: {first_line(error)}") from error
    except Exception as error:
        raise UnsupportedImage(
            f"{source} is truncated or corrupt and cannot be decoded ({first_line(error)})."
        ) from error


def _webp_size(data: bytes, source: str) -> tuple[int, int] | None:
    """A WebP file's width and height from its first chunk's header, or None if it is not WebP.

    The three kinds of WebP (RFC 9649): lossy "VP8 " keeps 14-bit sizes in
    its frame header, lossless "VP8L" 14-bit sizes minus one after its
    signature, and extended "VP8X" 24-bit canvas sizes minus one.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk, header = data[12:16], data[20:30]
    try:
        if chunk == b"VP8X":
            width = int.from_bytes(header[4:7], "little") + 1
            height = int.from_bytes(header[7:10], "little") + 1
            return width, height
        if chunk == b"VP8L" and header[:1] == b"\x2f":
            (bits,) = struct.unpack("<I", header[1:5])
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 " and header[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", header[6:10])
            return width & 0x3FFF, height & 0x3FFF
    except struct.error:
        pass
    raise UnsupportedImage(f"{source} is truncated or corrupt and cannot be decoded (a bad WebP header).")


def _jpeg_scans(data: bytes) -> int:
    """How many scans (SOS segments) a JPEG holds, walking its segments as a decoder does.

    Counting 0xFFDA anywhere would count the scans of an embedded EXIF
    thumbnail too; inside entropy-coded data a 0xFF is always followed by 0x00
    or a restart marker, so the walk can skip it.
    """
    scans, position = 0, 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xD9:  # end of image
            break
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            scans += 1
            position = _end_of_entropy_data(data, position)
    return scans


def _end_of_entropy_data(data: bytes, position: int) -> int:
    while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
        following = data[position + 1]
        if following != 0x00 and not 0xD0 <= following <= 0xD7:
            return position
        position += 2
    return len(data)


def _jpeg_samples_per_pixel(pillow: Image.Image) -> float:
    """Component samples per image pixel, from the sampling factors (1.5 for 4:2:0 YCbCr)."""
    layers = getattr(pillow, "layer", None) or [("", 1, 1, 0)] * len(pillow.getbands())
    widest = max(h for _, h, _, _ in layers) * max(v for _, _, v, _ in layers)
    return sum(h * v for _, h, v, _ in layers) / widest


def _bytes_per_pixel(mode: str) -> int:
    if mode in _ONE_BYTE_MODES:
        return 1
    return 2 if mode in _TWO_BYTE_MODES else 4


def _shrink(image: Image.Image, min_short_side: int) -> Image.Image:
    """Box-average the decoded frame down to about ``SHRINK_MARGIN`` times the target.

    A strip of rows at a time is converted to a mode Pillow can average and
    reduced into the output, so no conversion ever holds a second full-size
    frame. The strips are whole multiples of the factor, so the result equals
    one ``reduce`` of the converted image.
    """
    factor = min(image.size) // (SHRINK_MARGIN * min_short_side)
    mode = _reducible_mode(image)
    if factor < 2:
        return image if mode == image.mode else image.convert(mode)
    width, height = image.size
    rows = max(factor, STRIP_BYTES // max(width * 4, 1) // factor * factor)
    shrunk = Image.new(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height)))
        if strip.mode != mode:
            strip = strip.convert(mode)
        shrunk.paste(strip.reduce(factor), (0, top // factor))
    return shrunk


def _reducible_mode(image: Image.Image) -> str:
    if image.mode == "P" and "transparency" in image.info:
        return "RGBA"
    return _REDUCIBLE.get(image.mode, image.mode)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels are laid on white, as a viewer shows them."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "F", *_TWO_BYTE_MODES):
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8 bits by their range, not by clipping.

    Pillow's own ``convert`` clips these to 0..255, which turns a normal
    16-bit photo white. Integer images are scaled from the 16-bit range when
    they fit it (16-bit PNG and TIFF arrive as ``I;16`` or ``I``); float
    images from [0, 1] when they fit it; anything else is stretched from its
    own minimum to maximum. It runs on the shrunk picture, in float32.
    """
    values = np.asarray(image, dtype=np.float32)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    elif image.mode != "F" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.nan_to_num((values - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
