"""decode() raises nothing but DecodeError, whatever the bytes: random data and mutated valid files."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcovid.decode import decode
from deepcovid.errors import REASONS, DecodeError
from tests.fixtures.images import dicom_bytes, gif_bytes, jpeg_bytes, png_bytes, pydicom_test_file

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1_000_000  # keeps mutated headers that declare big images cheap to refuse

BASES = [
    png_bytes(size=24),
    png_bytes(mode="RGBA", size=24),
    png_bytes(mode="P", size=24),
    png_bytes(bits=16, size=24),
    jpeg_bytes(size=24),
    jpeg_bytes(cmyk=True, exif_orientation=6, size=24),
    gif_bytes(frames=2, size=8),
    dicom_bytes(size=24),
    dicom_bytes(photometric="MONOCHROME1", window=(100, 50), rescale=(2.0, -5.0), size=16),
    pydicom_test_file("MR_small_RLE.dcm"),
    pydicom_test_file("MR_small_jp2klossless.dcm"),
    pydicom_test_file("MR_small_jpeg_ls_lossless.dcm"),
    pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm"),
]


def check(data: bytes) -> None:
    try:
        decoded = decode(data, max_pixels=LIMIT)
    except DecodeError as exc:
        assert exc.reason in REASONS
        return
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.ndim == 2 or (decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(
    base=st.sampled_from(range(len(BASES))),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    insert=st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=16))),
)
def test_mutated_valid_files(
    base: int, edits: list[tuple[int, int]], cut: int | None, insert: tuple[int, bytes] | None
) -> None:
    data = bytearray(BASES[base])
    for position, value in edits:
        data[position % len(data)] = value
    if insert is not None:
        at = insert[0] % len(data)
        data[at:at] = insert[1]
    if cut is not None:
        del data[cut % len(data) :]
    check(bytes(data))


@FUZZ
@given(base=st.sampled_from(range(len(BASES))), start=st.integers(min_value=0), length=st.integers(1, 64))
def test_header_region_mutations(base: int, start: int, length: int) -> None:
    """Scribble over the first few hundred bytes, where sizes, modes and DICOM headers live."""
    data = bytearray(BASES[base])
    begin = start % min(len(data), 400)
    data[begin : begin + length] = bytes((start + i * 37) % 256 for i in range(length))
    check(bytes(data))
