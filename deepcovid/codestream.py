"""The image size a compressed frame declares in its own header (JPEG, JPEG-LS, JPEG 2000).

Codecs allocate what the codestream declares, whatever a DICOM file's Rows and Columns say, so a 1 KB
frame in a DICOM that claims 64 x 64 could still make OpenJPEG allocate gigabytes. The decoder checks
both sizes before decoding.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# JPEG start-of-frame markers that carry the frame size: SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC),
# plus JPEG-LS's SOF55 (F7).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# Markers without a length field: TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of every JPEG 2000 codestream
_SEARCH_BYTES = 1 << 16  # JP2 boxes before the codestream, or JPEG tables before SOF, fit well within this


class FrameSize(NamedTuple):
    """What a codestream header declares."""

    width: int
    height: int
    components: int
    precision: int  # bits per sample


def declared_size(frame: bytes) -> FrameSize | None:
    """The size the start of a JPEG, JPEG-LS or JPEG 2000 (raw or JP2) frame declares, or None when its
    header is not found in the first bytes (the codec then reports what is wrong)."""
    head = frame[:_SEARCH_BYTES]
    try:
        if head.startswith(b"\xff\xd8"):
            return _jpeg(head)
        at = head.find(_J2K_SIZ)
        if at >= 0:
            return _j2k(head, at + len(_J2K_SIZ))
    except struct.error:  # a header cut short: not this module's to report
        return None
    return None


def _jpeg(head: bytes) -> FrameSize | None:
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        (length,) = struct.unpack_from(">H", head, at + 2)
        if marker in _JPEG_SOF:
            precision, height, width, components = struct.unpack_from(">BHHB", head, at + 4)
            return FrameSize(width, height, components, precision)
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        at += 2 + length
    return None


def _j2k(head: bytes, at: int) -> FrameSize | None:
    # SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then for each
    # component Ssiz (signedness and bits - 1), XRsiz, YRsiz.
    _, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, components = struct.unpack_from(">HHIIIIIIIIH", head, at)
    ssiz = head[at + 38 : at + 38 + 3 * components : 3]
    if not components or len(ssiz) < components:
        return None
    precision = max((s & 0x7F) + 1 for s in ssiz)
    return FrameSize(max(0, xsiz - xosiz), max(0, ysiz - yosiz), components, precision)
