"""The one table of image formats: what listing, decoding, training and inspect agree on."""

from __future__ import annotations

from PIL import Image

from deepcovid.decode import decode
from deepcovid.formats import (
    ARCHIVE_SUFFIXES,
    FORMATS,
    IMAGE_SUFFIXES,
    PILLOW_FORMATS,
    SNIFF_BYTES,
    is_dicom,
    looks_like_archive_image,
    sniff,
)
from tests.fixtures.images import dicom_bytes, jpeg_bytes, xray_png_bytes


def test_every_suffix_belongs_to_one_format() -> None:
    suffixes = [s for fmt in FORMATS for s in fmt.suffixes]
    assert len(suffixes) == len(set(suffixes)) == len(IMAGE_SUFFIXES)
    assert all(s.startswith(".") and s == s.lower() for s in suffixes)


def test_archive_listing_takes_png_jpeg_and_dicom_only() -> None:
    assert {".png", ".jpg", ".jpeg", ".dcm", ".dicom"} <= set(ARCHIVE_SUFFIXES)
    assert not {".tif", ".tiff", ".gif", ".bmp", ".webp"} & set(ARCHIVE_SUFFIXES)


def test_pillow_formats_are_real_plugins() -> None:
    Image.init()
    assert set(PILLOW_FORMATS) <= set(Image.OPEN)


def test_sniff_recognises_what_the_decoder_reads() -> None:
    for data, name in ((xray_png_bytes(), "PNG"), (jpeg_bytes(), "JPEG"), (dicom_bytes(), "DICOM")):
        head = data[:SNIFF_BYTES]
        fmt = sniff(head)
        assert fmt is not None and fmt.name == name
        assert looks_like_archive_image(head)
        assert decode(data).info.format.startswith(name[:3]) or name == "DICOM"
    assert is_dicom(dicom_bytes()) and not is_dicom(xray_png_bytes())
    assert sniff(b"GIF89a") is not None and not looks_like_archive_image(b"GIF89a")
    assert sniff(b"") is None and sniff(b"RIFF\x00\x00\x00\x00WAVE") is None
