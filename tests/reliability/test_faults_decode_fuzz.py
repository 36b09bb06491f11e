"""Fuzzing what tests/deepcovid/test_decode_fuzz.py leaves out: the pipeline's fast path and size bombs.

That file fuzzes ``decode()`` with random bytes and mutated PNG/JPEG/GIF/DICOM. Workers call
``preprocess.load_image`` instead, which decodes JPEGs at a reduced DCT scale (``draft``) and resizes:
fuzzed here on images big enough for the draft to apply. PNG headers declaring random sizes (with valid
CRCs) must be refused as ``too_large`` from the header, before any pixel buffer is allocated.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepcovid.errors import REASONS, DecodeError
from deepcovid.preprocess import INPUT_SIZE, load_image
from tests.fixtures.faults import png_declaring
from tests.fixtures.images import dicom_bytes, jpeg_bytes, png_bytes

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 4_000_000

# Larger than 2 x 224 on the short side, so load_image's JPEG draft and box reduction really run.
BASES = [
    jpeg_bytes(size=(1000, 600), quality=60),
    jpeg_bytes(gray=True, size=(900, 700), quality=60, exif_orientation=6),
    jpeg_bytes(cmyk=True, size=(800, 500), quality=60),
    png_bytes(bits=16, size=(600, 480)),
    dicom_bytes(size=(520, 470)),
]


def check_load_image(data: bytes, name: str = "") -> None:
    try:
        pixels, info = load_image(data, name=name, max_pixels=LIMIT)
    except DecodeError as exc:
        assert exc.reason in REASONS
        return
    assert pixels.dtype == np.uint8
    assert pixels.shape in ((INPUT_SIZE, INPUT_SIZE), (INPUT_SIZE, INPUT_SIZE, 3))
    assert info.width > 0 and info.height > 0


@FUZZ
@given(
    base=st.sampled_from(range(len(BASES))),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=16),
    header_edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_load_image_on_mutated_large_images(
    base: int, edits: list[tuple[int, int]], header_edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(BASES[base])
    for position, value in [*edits, *header_edits]:
        data[position % len(data)] = value
    if cut is not None:
        del data[max(1, cut % len(data)) :]
    check_load_image(bytes(data), name="x.dcm" if base == len(BASES) - 1 else "x.jpg")


@FUZZ
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_declared_size_bombs_are_refused_from_the_header(width: int, height: int) -> None:
    data = png_declaring(width, height)
    if width * height > LIMIT:
        try:
            load_image(data, max_pixels=LIMIT)
        except DecodeError as exc:
            assert exc.reason == "too_large", (width, height, exc)
        else:
            raise AssertionError(f"{width}x{height} was decoded")
    else:
        check_load_image(data)


def test_extreme_aspect_ratio_is_cropped_not_blown_up() -> None:
    """A 1 x 3,000,000 PNG is a few kB: resizing its short side to 224 would need 670 M pixels. Only the
    centre crop is resampled, so it costs no more than any other image."""
    import io

    from PIL import Image

    for size in ((1, 3_000_000), (3_000_000, 1)):
        buffer = io.BytesIO()
        Image.new("L", size, 128).save(buffer, "PNG")
        pixels, info = load_image(buffer.getvalue(), max_pixels=LIMIT)
        assert pixels.shape == (INPUT_SIZE, INPUT_SIZE) and (info.width, info.height) == size
