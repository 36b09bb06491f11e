"""The one table of image formats: suffixes, the bytes that identify them, and which decoder reads them.

Listing, decoding, training and ``inspect`` all read this table, so a format is added or dropped in one
place. ``archive`` marks the formats X-ray archives are made of (PNG, JPEG, DICOM): an archive listing
takes them by default and recognises them by content in files without a suffix. The others decode when
given (``--include``, ``inspect``, training folders) but are not listed by default: a GIF or a BMP in an
archive is more often a logo or a thumbnail than a radiograph.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    """One format: how files of it are named and recognised, and which decoder reads them."""

    name: str
    suffixes: tuple[str, ...]
    magic: tuple[bytes, ...]  # any of these at ``offset`` identifies the format
    decoder: str  # "pillow" or "dicom"
    archive: bool  # listed by default and recognised by sniffing (see module doc)
    offset: int = 0

    def matches(self, head: bytes) -> bool:
        """Whether the first bytes of a file are this format's signature."""
        window = head[self.offset :]
        return any(window.startswith(magic) for magic in self.magic)


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("PNG", (".png",), (b"\x89PNG",), "pillow", archive=True),
    ImageFormat("JPEG", (".jpg", ".jpeg", ".jpe", ".jfif"), (b"\xff\xd8\xff",), "pillow", archive=True),
    # A DICOM Part 10 file: a 128-byte preamble, then "DICM".
    ImageFormat("DICOM", (".dcm", ".dicom"), (b"DICM",), "dicom", archive=True, offset=128),
    ImageFormat("TIFF", (".tif", ".tiff"), (b"II*\x00", b"MM\x00*"), "pillow", archive=False),
    ImageFormat("BMP", (".bmp",), (b"BM",), "pillow", archive=False),
    ImageFormat("GIF", (".gif",), (b"GIF8",), "pillow", archive=False),
    ImageFormat("WEBP", (".webp",), (b"RIFF",), "pillow", archive=False),
)

SNIFF_BYTES = max(f.offset + max(len(m) for m in f.magic) for f in FORMATS)
"""Bytes to read from the start of a file to recognise any format of the table."""

IMAGE_SUFFIXES: frozenset[str] = frozenset(s for f in FORMATS for s in f.suffixes)
"""Every suffix a decoder reads (``inspect`` and training folders walk these)."""

ARCHIVE_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS if f.archive for s in f.suffixes)
"""Suffixes an archive listing takes by default: those of the archive formats."""

PILLOW_FORMATS: tuple[str, ...] = tuple(f.name for f in FORMATS if f.decoder == "pillow")
"""The Pillow plugins the decoder may open; no other plugin (EPS runs Ghostscript) is ever tried."""


def sniff(head: bytes) -> ImageFormat | None:
    """The format whose signature starts ``head`` (WebP also needs its ``WEBP`` tag), or None."""
    for fmt in FORMATS:
        if fmt.matches(head) and (fmt.name != "WEBP" or head[8:12] == b"WEBP"):
            return fmt
    return None


def is_dicom(head: bytes) -> bool:
    """A DICOM Part 10 file: the preamble then ``DICM``."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_archive_image(head: bytes) -> bool:
    """True when the first bytes are one of the archive formats (PNG, JPEG, DICOM with its preamble)."""
    fmt = sniff(head)
    return fmt is not None and fmt.archive
