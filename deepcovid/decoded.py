"""What every decoder hands back: the pixels with what was learnt about the image, or a ``DecodeError``.

Library failures on hostile bytes are turned into a ``DecodeError`` here, the same way for every format,
so one bad file fails only itself.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from deepcovid.errors import DecodeError

NEVER_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""Exceptions that end the process or the generator, never one image's decode."""

Transform = Callable[[np.ndarray], np.ndarray]
"""Work done on decoded pixels while their bytes still count against the decode budget (a resize)."""

_DETAIL_LIMIT = 200


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


def library_failure(exc: BaseException, context: str = "") -> DecodeError:
    """The ``DecodeError`` for whatever a codec raised: ``truncated`` when it ran out of data, else
    ``corrupt`` (``too_large`` for Pillow's own bomb guard); ``context`` prefixes the detail."""
    detail = describe(exc)
    return DecodeError(_reason_for(exc), f"{context}: {detail}" if context else detail)


def describe(exc: BaseException) -> str:
    """One line naming the exception, short enough for a results table."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


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
