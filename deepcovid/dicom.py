"""DICOM bytes to ``uint8`` pixels: projection radiographs only, display transforms applied, memory bounded.

Choices made here:
- Accepted only for projection radiography: Modality CR, DX, DR (non-standard but common), RG and OT
  (secondary capture, e.g. digitised film). MG is refused (breast, not chest); CT, MR, PT, NM, US, XA and
  any missing Modality are refused as ``unsupported_dicom``, and so are multi-frame files (which frame
  is "the radiograph" is not knowable).
- High bit depths are scaled by the data's own min..max after the Modality LUT and the VOI LUT/window,
  never clipped to 8 bits.
- Sizes are checked from the header, and from the compressed frame's own header, before any pixel is
  decoded; the decoded bytes are then held against the process's decode budget (``deepcovid.limits``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom import config, dcmread
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import JPEG2000TransferSyntaxes

from deepcovid.codestream import FrameSize, declared_size
from deepcovid.decoded import NEVER_CAUGHT, DecodedImage, ImageInfo, Transform, describe
from deepcovid.dicomfields import DICOM_KEYWORDS
from deepcovid.eligibility import Eligibility
from deepcovid.errors import DecodeError
from deepcovid.limits import DECODING, check_decoded_bytes, check_pixels
from deepcovid.pixels import row_bands, scale_rows_to_uint8, scale_to_uint8


def _not_a_plugin_traceback(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info)


# pydicom logs a full traceback for each decoding plugin that fails before it raises; the image is
# already recorded with its failure reason, so those tracebacks would only repeat it in every log.
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_not_a_plugin_traceback)

PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})
# The (7FE0,0010) Pixel Data tag as it appears in little- and big-endian files.
_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"
# OpenJPEG decodes every sample into a 32-bit integer, whatever its precision.
_J2K_BYTES_PER_SAMPLE = 4


def decode_dicom(
    data: bytes,
    *,
    max_pixels: int,
    max_decoded_bytes: int,
    transform: Transform | None = None,
    eligibility: Eligibility | None = None,
) -> DecodedImage:
    """Decode a DICOM Part 10 file; raises ``DecodeError`` for what this screener refuses or cannot read.

    ``transform`` runs on the pixels while their bytes are still held against the decode budget;
    ``eligibility`` rules are checked on the header before any pixel is decoded (``not_eligible``).
    """
    # Value-validation warnings could quote element values (patient names among them).
    config.settings.reading_validation_mode = config.IGNORE
    try:
        ds = dcmread(io.BytesIO(data), force=False)
    except (EOFError, struct.error) as exc:
        raise DecodeError("truncated", f"DICOM header ends early: {describe(exc)}") from exc
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DecodeError("unsupported_dicom", "floating-point pixel data")
        if _PIXEL_DATA_TAG_LE in data or _PIXEL_DATA_TAG_BE in data:
            # pydicom drops an element the file ends inside: a partial transfer, not an unsupported file.
            raise DecodeError("truncated", "the file ends inside its pixel data")
        raise DecodeError("unsupported_dicom", "no pixel data (or the file ends before it)")
    # After the pixel-data checks: a file cut short reads as an empty header; it is truncated, not ineligible.
    if eligibility is not None:
        eligibility.check(lambda keyword: _text(ds, keyword))
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
    check_pixels(cols, rows, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 8)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    nbytes = _decoded_bytes(ds, rows, cols, samples, photometric, max_decoded_bytes)
    info = ImageInfo("DICOM", cols, rows, bits_stored, photometric, _audit(ds))

    convert = _converter(samples, photometric)
    with DECODING.hold(nbytes, max_decoded_bytes):
        pixels = convert(ds, photometric)
        if pixels.shape[:2] != (rows, cols) or not (pixels.ndim == 2 or pixels.shape[2] == 3):
            raise DecodeError("corrupt", f"decoded shape {pixels.shape} does not match {rows}x{cols}")
        if transform is not None:
            pixels = transform(pixels)
    return DecodedImage(pixels, info)


def _decoded_bytes(ds: Any, rows: int, cols: int, samples: int, photometric: str, limit: int) -> int:
    """What decoding holds: rows x columns x samples x bytes per sample (a palette counts its three
    colours; JPEG 2000 counts OpenJPEG's 32-bit integers). Refuses, as ``too_large``, an image over
    ``limit``, and as ``corrupt`` a compressed frame whose own header declares more pixels than the file's."""
    bits = int(ds.get("BitsAllocated", 0) or 8)
    per_sample = max(1, (bits + 7) // 8)
    j2k = ds.file_meta.get("TransferSyntaxUID") in JPEG2000TransferSyntaxes
    if j2k:
        per_sample = max(per_sample, _J2K_BYTES_PER_SAMPLE)
    nbytes = rows * cols * (3 if photometric == "PALETTE COLOR" else samples) * per_sample
    what = f"{cols}x{rows} with {samples} sample(s) per pixel"
    check_decoded_bytes(nbytes, limit, what)
    frame = _frame_header_size(ds)
    if frame is None:
        return nbytes
    per_sample = _J2K_BYTES_PER_SAMPLE if j2k else max(1, (frame.precision + 7) // 8)
    frame_bytes = frame.width * frame.height * frame.components * per_sample
    if frame.width * frame.height > cols * rows:  # pydicom would refuse it after the codec allocated it
        raise DecodeError(
            "corrupt", f"the compressed frame declares {frame.width}x{frame.height}, the header {cols}x{rows}"
        )
    check_decoded_bytes(frame_bytes, limit, what)
    return max(nbytes, frame_bytes)


def _frame_header_size(ds: Any) -> FrameSize | None:
    """What the first compressed frame declares in its own header (codecs allocate that), or None."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_encapsulated:
        return None
    try:
        buffer = io.BytesIO(ds.PixelData)
        parse_basic_offsets(buffer)
        fragment = next(generate_fragments(buffer), b"")
    except Exception:  # malformed encapsulation: the decoder reports it with its own reason
        return None
    return declared_size(fragment)


def _converter(samples: int, photometric: str) -> Callable[[Any, str], np.ndarray]:
    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _gray
    if samples == 1 and photometric == "PALETTE COLOR":
        return _palette
    if samples == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        return _rgb
    raise DecodeError("unsupported_dicom", f"{samples} samples per pixel, {photometric or 'no'} photometric")


def _pixel_array(ds: Any) -> tuple[np.ndarray, str]:
    """The stored values as ``ds.pixel_array`` gives them, but left in YBR where the file is (``_rgb``
    converts band by band: pydicom converts the whole image in float32), with the colour space they are in."""
    try:
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        arr, properties = decoder.as_array(ds, validate=True, **as_pixel_options(ds, as_rgb=False))
    except NEVER_CAUGHT:
        raise
    except BaseException as exc:  # see decode.decode(): codec panics are BaseException
        message = str(exc).lower()
        short = any(word in message for word in ("truncat", "end of", "less than expected"))
        raise DecodeError("truncated" if short else "corrupt", f"pixel data: {describe(exc)}") from exc
    return arr, str(properties.get("photometric_interpretation", ""))


def _rgb(ds: Any, photometric: str) -> np.ndarray:
    arr, colour_space = _pixel_array(ds)
    if colour_space in ("YBR_FULL", "YBR_FULL_422"):
        for rows in row_bands(arr.shape[0], arr.shape[1] * 3):
            arr[rows] = convert_color_space(arr[rows], colour_space, "RGB")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return scale_to_uint8(arr)


def _palette(ds: Any, photometric: str) -> np.ndarray:
    arr, _ = _pixel_array(ds)
    return scale_rows_to_uint8((*arr.shape, 3), lambda rows: apply_color_lut(arr[rows], ds))


def _gray(ds: Any, photometric: str) -> np.ndarray:
    arr, _ = _pixel_array(ds)
    if arr.ndim != 2:
        raise DecodeError("unsupported_dicom", f"grayscale pixel array of shape {arr.shape}")
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 2:
        out = _integer_pixels_to_uint8(arr, ds)
    else:
        out = scale_rows_to_uint8(arr.shape, lambda rows: _display_values(arr[rows], ds))
    if photometric == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _display_values(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Modality LUT (or rescale), then the first VOI LUT or window; element by element."""
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
    bands = row_bands(arr.shape[0], arr.shape[1])
    counts = np.zeros(domain.size, np.int64)
    for rows in bands:  # bincount widens its input to int64: a band at a time
        counts += np.bincount(indices[rows].ravel(), minlength=domain.size)
    present = counts > 0
    lo, hi = float(values[present].min()), float(values[present].max())
    out = np.zeros(arr.shape, np.uint8)
    if not hi > lo:
        return out
    lut = np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    for rows in bands:
        out[rows] = lut[indices[rows]]
    return out


def _text(ds: Any, keyword: str) -> str:
    """An attribute as text ("" when absent or unreadable); multiple values joined by backslashes."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    return "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _audit(ds: Any) -> dict[str, str]:
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
