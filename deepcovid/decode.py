"""Bytes to pixels: PNG, JPEG (and a few other Pillow formats) and DICOM, as ``uint8`` gray or RGB.

Every failure is a ``DecodeError`` carrying a reason from ``deepcovid.errors.REASONS``, so one bad
file fails only itself. Sizes are checked from the header before any pixel is decoded: pixels against
``Settings.max_image_pixels``, and the bytes decoding would hold against ``Settings.max_decoded_bytes``.
The decode then holds those bytes against a budget every decode thread of the process shares
(``deepcovid.limits``).

Choices made here (DICOM's are in ``deepcovid.dicom``):
- Multi-frame images (animated GIF/PNG/WebP, multi-page TIFF) are refused rather than scored on their
  first frame: which frame is "the radiograph" is not knowable. MPO (phone JPEGs with extra pictures)
  is the exception: its first frame is the primary image by definition.
- High bit depths are scaled by the data's own min..max, never clipped to 8 bits.
- Alpha is composited onto black, as the reference data set was prepared.
- Pillow's image is converted to 8 bits a band of rows at a time, and EXIF orientation is applied to the
  8-bit result, so no full-size copy of Pillow's image is made.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepcovid.decoded import NEVER_CAUGHT, DecodedImage, ImageInfo, Transform, library_failure
from deepcovid.eligibility import Eligibility
from deepcovid.errors import DecodeError
from deepcovid.formats import PILLOW_FORMATS, is_dicom, sniff
from deepcovid.limits import DECODING, check_decoded_bytes, check_pixels
from deepcovid.pixels import composite_on_black, row_bands, scale_rows_to_uint8
from deepcovid.settings import get_settings
from deepcovid.storage import read_local_file

# Our max_pixels check runs first; Pillow's own bomb warning would only repeat it as a warning.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# EXIF orientation -> the pixel permutation ImageOps.exif_transpose applies, here on the 8-bit result.
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # rotated 180 degrees
    4: lambda a: a[::-1],  # flipped
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # rotated 90 degrees anticlockwise
}


def decode(
    data: bytes,
    *,
    name: str = "",
    max_pixels: int | None = None,
    min_side: int | None = None,
    max_decoded_bytes: int | None = None,
    transform: Transform | None = None,
    eligibility: Eligibility | None = None,
) -> DecodedImage:
    """Decode image bytes; raises only ``DecodeError``. ``eligibility`` applies to DICOMs only.

    ``max_pixels`` and ``max_decoded_bytes`` default to the settings of those names. ``min_side`` lets
    JPEG decode at a reduced DCT scale whose shorter side is still at least that long (the fast path of
    ``preprocess.load_image``); ``info`` always reports the original size. ``transform`` runs on the
    pixels while their bytes are still held against the decode budget (preprocessing shrinks them there).
    """
    if not data:
        raise DecodeError("empty_file")
    pixel_limit = _pixel_limit(max_pixels)
    byte_limit = get_settings().max_decoded_bytes if max_decoded_bytes is None else max_decoded_bytes
    try:
        if is_dicom(data):
            from deepcovid.dicom import decode_dicom  # pydicom: a second of import, only once a DICOM comes

            return decode_dicom(
                data,
                max_pixels=pixel_limit,
                max_decoded_bytes=byte_limit,
                transform=transform,
                eligibility=eligibility,
            )
        return _decode_pil(data, pixel_limit, byte_limit, min_side, name, transform)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("too_large", "ran out of memory while decoding") from exc
    except NEVER_CAUGHT:
        raise
    # Any library failure on hostile bytes is this image's failure only. BaseException: the Rust
    # codecs (pylibjpeg-rle) raise pyo3's PanicException, which is not an Exception.
    except BaseException as exc:
        raise library_failure(exc) from exc


def decode_path(
    path: str | Path,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    min_side: int | None = None,
) -> DecodedImage:
    """Read and decode a local file; OS errors become ``StorageError``, bad bytes ``DecodeError``."""
    data = read_file(path, max_bytes=max_bytes)
    return decode(data, name=str(path), max_pixels=max_pixels, min_side=min_side)


def read_file(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """Read a whole regular local file (``storage.read_local_file``), at most ``max_bytes``
    (default ``Settings.max_file_bytes``). Details never repeat the path: it may name a patient."""
    return read_local_file(path, get_settings().max_file_bytes if max_bytes is None else max_bytes)


def _pixel_limit(max_pixels: int | None) -> int:
    if max_pixels is None:
        max_pixels = get_settings().max_image_pixels
    # Pillow refuses at twice its own limit during open; keep it above ours so ours decides.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    return max_pixels


# --- Pillow formats -------------------------------------------------------------------------------


def _decode_pil(
    data: bytes,
    pixel_limit: int,
    byte_limit: int,
    min_side: int | None,
    name: str,
    transform: Transform | None,
) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unidentified(data, name) from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"the header declares more than {pixel_limit} pixels") from exc
    try:
        fmt = img.format or "unknown"
        width, height = img.size
        check_pixels(width, height, pixel_limit)
        if getattr(img, "n_frames", 1) > 1 and fmt != "MPO":
            raise DecodeError(
                "unsupported_image", f"{fmt} with {img.n_frames} frames (animated or multi-page)"
            )
        mode = img.mode
        bit_depth = _pil_bit_depth(img)
        check_decoded_bytes(_pil_decoded_bytes(img), byte_limit, f"{width}x{height} {fmt} {mode}")
        if min_side and fmt in ("JPEG", "MPO"):
            scale = min_side / min(width, height)
            img.draft(img.mode, (max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))))
        with DECODING.hold(_pil_decoded_bytes(img), byte_limit):  # after draft: what load() allocates
            img.load()  # before EXIF: PNG reads EXIF by loading, and that must not swallow decode errors
            orientation = _exif_orientation(img)
            pixels = _pil_to_uint8(img)
            img.close()  # frees Pillow's pixels before the 8-bit ones are turned or transformed
            turn = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
            if turn is not None:
                pixels = np.ascontiguousarray(turn(pixels))
                if orientation >= 5:
                    width, height = height, width
            if transform is not None:
                pixels = transform(pixels)
    finally:
        img.close()
    return DecodedImage(pixels, ImageInfo(fmt, width, height, bit_depth, mode))


def _unidentified(data: bytes, name: str) -> DecodeError:
    fmt = sniff(data)
    if fmt is not None and fmt.name in ("PNG", "JPEG", "GIF", "TIFF"):
        if len(data) < 64:
            return DecodeError("truncated", f"{len(data)} bytes: too short for a {fmt.name} header")
        return DecodeError("corrupt", f"starts like {fmt.name} but its header cannot be read")
    if fmt is not None and fmt.name == "WEBP":
        return DecodeError("corrupt", "starts like WebP but its header cannot be read")
    if name.lower().endswith((".dcm", ".dicom")):
        return DecodeError("not_an_image", "no DICOM 'DICM' marker at byte 128 (not a DICOM Part 10 file)")
    return DecodeError("not_an_image", "not PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM")


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # broken EXIF: the pixels are still fine, use them as stored
        return None


def _pil_bit_depth(img: Image.Image) -> int:
    if img.mode == "1":
        return 1
    if img.mode.startswith("I;16"):
        return 16
    if img.mode in ("I", "F"):
        return 32
    return 8


def _pil_decoded_bytes(img: Image.Image) -> int:
    """Bytes loading ``img`` holds: Pillow's pixels, plus the codec's own buffer where it decodes elsewhere
    first (libtiff a strip or tile at a time; libwebp the whole RGBA image, handed over as a copy)."""
    width, height = img.size
    pixel = _pil_pixel_bytes(img.mode)
    nbytes = width * height * pixel
    if img.format == "WEBP":
        return nbytes + 2 * width * height * 4
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        tile = _tag_int(tags, 322) * _tag_int(tags, 323)  # TileWidth x TileLength
        strip = min(height, _tag_int(tags, 278) or height) * width  # RowsPerStrip
        return nbytes + (tile or strip) * pixel
    return nbytes


def _tag_int(tags: Any, tag: int) -> int:
    value = tags.get(tag)
    return value if isinstance(value, int) and value > 0 else 0


def _pil_pixel_bytes(mode: str) -> int:
    """Bytes a pixel of ``mode`` holds while decoding: Pillow keeps RGB, RGBA, LA, CMYK, I and F in 4 bytes;
    a palette image is expanded to RGB."""
    if mode in ("1", "L"):
        return 1
    if mode == "P":
        return 3
    if mode.startswith("I;16"):
        return 2
    return 4


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    width, height = img.size
    if mode in ("L", "1"):
        return _converted(img, "L", (height, width))
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return _converted(img, "RGB", (height, width, 3))
    if mode in ("LA", "La"):
        return _converted(img, "LA", (height, width), composite_on_black)
    if mode in ("RGBA", "RGBa"):
        return _converted(img, "RGBA", (height, width, 3), composite_on_black)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        rgb = _converted(
            img, "RGBA" if has_alpha else "RGB", (height, width, 3), composite_on_black if has_alpha else None
        )
        if all(_is_gray(rgb[rows]) for rows in row_bands(height, width * 3)):
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    if mode.startswith("I") or mode == "F":
        return scale_rows_to_uint8((height, width), lambda rows: np.asarray(_band(img, rows)))
    raise DecodeError("unsupported_image", f"pixel mode {mode}")


def _band(img: Image.Image, rows: slice, mode: str | None = None) -> Image.Image:
    """The rows ``rows`` of ``img`` as an image of their own, converted to ``mode``."""
    band = img.crop((0, rows.start, img.size[0], rows.stop))
    return band if mode is None or band.mode == mode else band.convert(mode)


def _converted(
    img: Image.Image,
    mode: str,
    shape: tuple[int, ...],
    per_band: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``img`` converted to ``mode`` (then ``per_band``) into a ``uint8`` array of ``shape``, band by band:
    every conversion used here is pixel by pixel, so the bands give what the whole image would."""
    out = np.empty(shape, np.uint8)
    for rows in row_bands(shape[0], img.size[0] * 4):
        band = np.asarray(_band(img, rows, mode))
        out[rows] = band if per_band is None else per_band(band)
    return out


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
