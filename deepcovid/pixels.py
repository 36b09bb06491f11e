"""Pixel values to ``uint8`` a band of rows at a time, so no full-size float copy of an image is made.

A float64 copy costs 8 bytes per sample (1.5 GB for an 8000 x 8000 RGB image). Every step below is
element by element once the min..max range is known, so bands of about a million samples give exactly the
values a whole-image computation gives, with temporaries of a few megabytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BAND_SAMPLES = 1 << 20
"""Samples per band: float64 temporaries of 8 MB."""

Rows = Callable[[slice], np.ndarray]
"""The values of a band of rows, given its slice (an array view, or computed on the fly)."""


def row_bands(height: int, samples_per_row: int) -> list[slice]:
    """Slices covering ``height`` rows, each of about ``BAND_SAMPLES`` samples (at least one row)."""
    step = max(1, BAND_SAMPLES // max(1, samples_per_row))
    return [slice(start, min(height, start + step)) for start in range(0, height, step)]


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map the data's own min..max onto 0..255 (a constant image becomes 0): never clips.

    ``uint8`` data is kept as stored; 16-bit unsigned data goes through a 65,536-entry lookup table.
    """
    return scale_rows_to_uint8(arr.shape, lambda rows: arr[rows])


def scale_rows_to_uint8(shape: tuple[int, ...], values: Rows) -> np.ndarray:
    """``scale_to_uint8`` of an image of ``shape`` given band by band.

    ``values(rows)`` is called once or twice per band (for the range, then to scale) and must return the
    same values each time, all bands of one dtype.
    """
    out = np.empty(shape, np.uint8)
    bands = row_bands(shape[0], int(np.prod(shape[1:], dtype=np.int64)))
    if not bands:
        return out
    dtype = values(bands[0]).dtype
    if dtype == np.uint8:
        for rows in bands:
            out[rows] = values(rows)
        return out
    if dtype.kind == "u" and dtype.itemsize == 2:
        return _scale_uint16(out, bands, values)
    return _scale_float(out, bands, values)


def _scale_uint16(out: np.ndarray, bands: list[slice], values: Rows) -> np.ndarray:
    lo, hi = 65535, 0
    for rows in bands:
        band = values(rows)
        lo, hi = min(lo, int(band.min())), max(hi, int(band.max()))
    if hi <= lo:
        out.fill(0)
        return out
    lut = np.clip(np.rint((np.arange(65536, dtype=np.float64) - lo) * (255.0 / (hi - lo))), 0, 255)
    lut8 = lut.astype(np.uint8)
    for rows in bands:
        out[rows] = lut8[values(rows)]
    return out


def _finite_float64(band: np.ndarray) -> np.ndarray:
    """The band as float64, NaN and infinities replaced by 0."""
    band = np.asarray(band, dtype=np.float64)
    finite = np.isfinite(band)
    return band if finite.all() else np.where(finite, band, 0.0)


def _scale_float(out: np.ndarray, bands: list[slice], values: Rows) -> np.ndarray:
    lo = hi = None
    for rows in bands:
        band = _finite_float64(values(rows))
        band_lo, band_hi = float(band.min()), float(band.max())
        lo = band_lo if lo is None else min(lo, band_lo)
        hi = band_hi if hi is None else max(hi, band_hi)
    if lo is None or hi is None or not hi > lo:
        out.fill(0)
        return out
    scale = 255.0 / (hi - lo)
    for rows in bands:
        band = (_finite_float64(values(rows)) - lo) * scale
        out[rows] = np.clip(np.rint(band), 0, 255)
    return out


def composite_on_black(arr: np.ndarray) -> np.ndarray:
    """``uint8`` colour-plus-alpha samples (LA or RGBA) composited onto black, alpha dropped."""
    color = arr[..., :-1].astype(np.uint16)
    alpha = arr[..., -1:].astype(np.uint16)
    out = ((color * alpha + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out
