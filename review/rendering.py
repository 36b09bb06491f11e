"""An image as the viewer shows it: decoded from its source bytes, DICOM through its VOI LUT or window
(or the window/level the reviewer chose), shrunk to the overlay's size, as PNG."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from deepcovid import defaults
from deepcovid.decode import decode
from deepcovid.errors import DecodeError
from deepcovid.formats import is_dicom
from deepcovid.overlay import display_size


@dataclass(frozen=True)
class Window:
    """A DICOM window: centre and width in the modality's values (after the Modality LUT)."""

    center: float
    width: float


@dataclass(frozen=True)
class Rendered:
    png: bytes
    size: tuple[int, int]  # the PNG's (width, height)
    original: tuple[int, int]  # the image's (width, height) as displayed
    window: Window | None  # DICOM only: the window used


def render(
    data: bytes, *, window: Window | None = None, max_side: int = defaults.OVERLAY_MAX_SIDE
) -> Rendered:
    """Decode ``data`` (every check and limit of scoring applies) and draw it; raises DecodeError."""
    decoded = decode(data)
    pixels = decoded.pixels
    used = None
    if is_dicom(data) and pixels.ndim == 2:
        used, windowed = _dicom_window(data, window)
        if windowed is not None:
            pixels = windowed
    height, width = pixels.shape[:2]
    size = display_size(width, height, max_side)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "PNG")
    return Rendered(out.getvalue(), size, (width, height), used)


def _dicom_window(data: bytes, window: Window | None) -> tuple[Window | None, np.ndarray | None]:
    """The file's own window (or the data range) and, when ``window`` overrides it, the pixels through it."""
    from pydicom import dcmread  # a second of import: only for DICOM
    from pydicom.pixels import apply_modality_lut

    try:
        ds = dcmread(io.BytesIO(data))
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception as exc:  # decode() read it a moment ago; anything now is the file's damage
        raise DecodeError("corrupt", f"DICOM pixels: {type(exc).__name__}") from exc
    own = _own_window(ds, values)
    if window is None:
        return own, None
    width = max(float(window.width), 1.0)
    scaled = ((values - (window.center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5).clip(0.0, 1.0)
    pixels = np.rint(scaled * 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        np.subtract(255, pixels, out=pixels)
    return window, pixels


def _own_window(ds: object, values: np.ndarray) -> Window:
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    try:
        if center is not None and width is not None:
            return Window(_first(center), _first(width))
    except (TypeError, ValueError, IndexError):
        pass
    lo, hi = float(values.min()), float(values.max())
    return Window((lo + hi) / 2, max(hi - lo, 1.0))


def _first(value: object) -> float:
    """A window value, or the first of several (the file's default window)."""
    if hasattr(value, "__len__") and not isinstance(value, str):
        return float(value[0])  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]
