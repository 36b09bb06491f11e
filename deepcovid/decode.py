"""Bytes to pixels: PNG, JPEG (and a few other Pillow formats) and DICOM, as ``uint8`` gray or RGB.

Every failure is a ``DecodeError`` carrying a reason from ``deepcovid.errors.REASONS``, so one bad
file fails only itself. Sizes are checked from the header before any pixel is decoded.

Choices made here:
- Multi-frame images (animated GIF/PNG/WebP, multi-page TIFF, multi-frame DICOM) are refused rather
  than scored on their first frame: which frame is "the radiograph" is not knowable. MPO (phone
  JPEGs with extra pictures) is the exception: its first frame is the primary image by definition.
- DICOM is accepted only for projection radiography: Modality CR, DX, DR (non-standard but common),
  RG and OT (secondary capture, e.g. digitised film). MG is refused (breast, not chest); CT, MR, PT,
  NM, US, XA and any missing Modality are refused as ``unsupported_dicom``.
- High bit depths are scaled by the data's own min..max (after Modality LUT and VOI LUT/window for
  DICOM), never clipped to 8 bits.
- Alpha is composited onto black, as the reference data set was prepared.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deepcovid.errors import DecodeError, StorageError
from deepcovid.formats import PILLOW_FORMATS, is_dicom, sniff
from deepcovid.settings import get_settings

PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})
# DICOM attributes kept for audit, each cut to the longest value its VR allows (UI 64, CS 16).
# Patient name, id and birth date are deliberately absent.
DICOM_KEYWORDS: dict[str, int] = {
    "StudyInstanceUID": 64,
    "SeriesInstanceUID": 64,
    "SOPInstanceUID": 64,
    "Modality": 16,
    "ViewPosition": 16,
    "BodyPartExamined": 16,
}
# The kept attributes the results database stores in columns of their own, by column name.
DICOM_COLUMNS: dict[str, str] = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
    "view": "ViewPosition",
}
# The (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"
_DETAIL_LIMIT = 200
_NEVER_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)

# Our max_pixels check runs first; Pillow's own bomb warning would only repeat it as a warning.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageInfo:
    """What the decoder learnt about an image; safe to store (never patient identity)."""

    format: str
    width: int
    height: int
    bit_depth: int
    mode: str
    dicom: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as ``uint8`` ``HxW`` (gray) or ``HxWx3`` (RGB), with what was learnt while decoding."""

    pixels: np.ndarray
    info: ImageInfo


def decode(
    data: bytes, *, name: str = "", max_pixels: int | None = None, min_side: int | None = None
) -> DecodedImage:
    """Decode image bytes; raises only ``DecodeError``.

    ``max_pixels`` defaults to ``Settings.max_image_pixels``. ``min_side`` lets JPEG decode at a
    reduced DCT scale whose shorter side is still at least that long (the fast path of
    ``preprocess.load_image``); ``info`` always reports the original size.
    """
    if not data:
        raise DecodeError("empty_file")
    limit = _pixel_limit(max_pixels)
    try:
        if is_dicom(data):
            return _decode_dicom(data, limit)
        return _decode_pil(data, limit, min_side, name)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("too_large", "ran out of memory while decoding") from exc
    except _NEVER_CAUGHT:
        raise
    # Any library failure on hostile bytes is this image's failure only. BaseException: the Rust
    # codecs (pylibjpeg-rle) raise pyo3's PanicException, which is not an Exception.
    except BaseException as exc:
        raise DecodeError(_reason_for(exc), _describe(exc)) from exc


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
    """Read a whole local file, refusing files over ``max_bytes`` (default ``Settings.max_file_bytes``)."""
    if max_bytes is None:
        max_bytes = get_settings().max_file_bytes
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size > max_bytes:
                raise StorageError("too_large", f"file exceeds the limit of {max_bytes} bytes")
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise StorageError("not_found", f"no such file: {path}") from exc
    except PermissionError as exc:
        raise StorageError("permission_denied", f"permission denied: {path}") from exc
    except IsADirectoryError as exc:
        raise StorageError("is_a_directory", f"is a directory: {path}") from exc
    except OSError as exc:
        raise StorageError("unreadable", f"{path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise StorageError("too_large", f"file exceeds the limit of {max_bytes} bytes")
    return data


def _pixel_limit(max_pixels: int | None) -> int:
    if max_pixels is None:
        max_pixels = get_settings().max_image_pixels
    # Pillow refuses at twice its own limit during open; keep it above ours so ours decides.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    return max_pixels


def _check_size(width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds {limit}")
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt", f"declared size {width}x{height}")


# --- Pillow formats -------------------------------------------------------------------------------


def _decode_pil(data: bytes, limit: int, min_side: int | None, name: str) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unidentified(data, name) from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"the header declares more than {limit} pixels") from exc
    with img:
        fmt = img.format or "unknown"
        width, height = img.size
        _check_size(width, height, limit)
        if getattr(img, "n_frames", 1) > 1 and fmt != "MPO":
            raise DecodeError(
                "unsupported_image", f"{fmt} with {img.n_frames} frames (animated or multi-page)"
            )
        mode = img.mode
        bit_depth = _pil_bit_depth(img)
        if min_side and fmt in ("JPEG", "MPO"):
            scale = min_side / min(width, height)
            img.draft(img.mode, (max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale)))))
        img.load()  # before EXIF: PNG reads EXIF by loading, and that must not swallow decode errors
        orientation = _exif_orientation(img)
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
        pixels = _pil_to_uint8(img)
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


def _pil_to_uint8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode == "1":
        return np.array(img.convert("L"), dtype=np.uint8)
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in ("LA", "La"):
        return _composite_on_black(np.asarray(img.convert("LA")))
    if mode in ("RGBA", "RGBa"):
        return _composite_on_black(np.asarray(img.convert("RGBA")))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        rgb = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
        rgb = _composite_on_black(rgb) if has_alpha else np.array(rgb)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(img.convert("RGB"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return scale_to_uint8(np.asarray(img))
    raise DecodeError("unsupported_image", f"pixel mode {mode}")


def _composite_on_black(arr: np.ndarray) -> np.ndarray:
    color = arr[..., :-1].astype(np.uint16)
    alpha = arr[..., -1:].astype(np.uint16)
    out = ((color * alpha + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map the data's own min..max onto 0..255 (a constant image becomes 0): never clips."""
    if arr.dtype == np.uint8:
        return np.array(arr)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        lo, hi = int(arr.min()), int(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
        lut = np.clip(np.rint((np.arange(65536, dtype=np.float64) - lo) * (255.0 / (hi - lo))), 0, 255)
        return lut.astype(np.uint8)[arr]
    values = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, 0.0)
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    out = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- DICOM ----------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, limit: int) -> DecodedImage:
    from pydicom import config, dcmread

    # Value-validation warnings could quote element values (patient names among them).
    config.settings.reading_validation_mode = config.IGNORE
    try:
        ds = dcmread(io.BytesIO(data), force=False)
    except (EOFError, struct.error) as exc:
        raise DecodeError("truncated", f"DICOM header ends early: {_describe(exc)}") from exc

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DecodeError("unsupported_dicom", "floating-point pixel data")
        if _PIXEL_DATA_TAG_LE in data or _PIXEL_DATA_TAG_BE in data:
            # pydicom drops an element the file ends inside: a partial transfer, not an unsupported file.
            raise DecodeError("truncated", "the file ends inside its pixel data")
        raise DecodeError("unsupported_dicom", "no pixel data (or the file ends before it)")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in PROJECTION_MODALITIES:
        raise DecodeError(
            "unsupported_dicom",
            f"modality {modality or '(missing)'} is not a projection radiograph "
            f"(accepted: {', '.join(sorted(PROJECTION_MODALITIES))})",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError("unsupported_dicom", f"multi-frame DICOM ({frames} frames)")
    if "Rows" not in ds or "Columns" not in ds:
        raise DecodeError("corrupt", "DICOM without Rows/Columns")
    rows, cols = int(ds.Rows), int(ds.Columns)
    _check_size(cols, rows, limit)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 8)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    info = ImageInfo("DICOM", cols, rows, bits_stored, photometric, _dicom_audit(ds))

    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _dicom_gray(ds, photometric)
    elif samples == 1 and photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = scale_to_uint8(apply_color_lut(_dicom_array(ds), ds))
    elif samples == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        pixels = scale_to_uint8(_dicom_array(ds))  # pydicom converts YBR to RGB
    else:
        raise DecodeError(
            "unsupported_dicom", f"{samples} samples per pixel, {photometric or 'no'} photometric"
        )
    if pixels.shape[:2] != (rows, cols) or not (pixels.ndim == 2 or pixels.shape[2] == 3):
        raise DecodeError("corrupt", f"decoded shape {pixels.shape} does not match {rows}x{cols}")
    return DecodedImage(pixels, info)


def _dicom_array(ds: Any) -> np.ndarray:
    try:
        return ds.pixel_array
    except _NEVER_CAUGHT:
        raise
    except BaseException as exc:  # see decode(): codec panics are BaseException
        message = str(exc).lower()
        short = any(word in message for word in ("truncat", "end of", "less than expected"))
        raise DecodeError("truncated" if short else "corrupt", f"pixel data: {_describe(exc)}") from exc


def _dicom_gray(ds: Any, photometric: str) -> np.ndarray:
    arr = _dicom_array(ds)
    if arr.ndim != 2:
        raise DecodeError("unsupported_dicom", f"grayscale pixel array of shape {arr.shape}")
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 2:
        out = _integer_pixels_to_uint8(arr, ds)
    else:
        out = scale_to_uint8(_display_values(arr, ds))
    if photometric == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _display_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT (or rescale), then the first VOI LUT or window; element by element."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        # A broken window is metadata damage; the data range still displays the image.
        with contextlib.suppress(Exception):
            arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
    return arr


def _integer_pixels_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """``scale_to_uint8(_display_values(arr, ds))`` with the same result, through one lookup table.

    The display transforms work element by element, so they are applied to every possible stored value
    (65,536) instead of to millions of pixels in float64; the min..max scaling uses only the values the
    image holds. For 16-bit pixels only (8-bit data without a VOI is kept as stored by scale_to_uint8).
    """
    domain = np.arange(1 << 16, dtype=np.uint16).view(arr.dtype)
    values = np.asarray(_display_values(domain, ds), dtype=np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    indices = arr.view(np.uint16)
    present = np.bincount(indices.ravel(), minlength=domain.size) > 0
    lo, hi = float(values[present].min()), float(values[present].max())
    if not hi > lo:
        return np.zeros(arr.shape, np.uint8)
    lut = np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return lut[indices]


def _dicom_audit(ds: Any) -> dict[str, str]:
    kept: dict[str, str] = {}
    for keyword, length in DICOM_KEYWORDS.items():
        try:
            value = ds.get(keyword)
        except Exception:
            continue
        if value is None:
            continue
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        text = text.strip()
        if text:
            kept[keyword] = text[:length]
    return kept


def dicom_columns(info: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The ``DICOM_COLUMNS`` values of an image, from the ``info`` the decoder produced (None if absent)."""
    dicom = (info or {}).get("dicom") or {}
    return {column: dicom.get(keyword) or None for column, keyword in DICOM_COLUMNS.items()}


# --- failure mapping ------------------------------------------------------------------------------


def _reason_for(exc: BaseException) -> str:
    message = str(exc).lower()
    if isinstance(exc, Image.DecompressionBombError):
        return "too_large"
    if isinstance(exc, (EOFError, struct.error)) or "truncated" in message or "end of file" in message:
        return "truncated"
    if isinstance(exc, zlib.error) and "incomplete" in message:
        return "truncated"
    if "incomplete" in message and "checksum" not in message:
        return "truncated"
    return "corrupt"


def _describe(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."
