"""Reasons that must name the real problem: a partial transfer is ``truncated``, not "unsupported"."""

from __future__ import annotations

import pytest

from deepcovid.decode import decode
from deepcovid.errors import DecodeError
from tests.fixtures.faults import truncated_compressed_dicom
from tests.fixtures.images import dicom_bytes

pytestmark = pytest.mark.timeout(60)


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, name="x.dcm")
    return info.value.reason


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_compressed_dicom_cut_inside_its_pixel_data_is_truncated(name: str) -> None:
    assert reason_of(truncated_compressed_dicom(name)) == "truncated"


def test_uncompressed_dicom_cut_inside_its_pixel_data_is_truncated() -> None:
    data = dicom_bytes(size=64)
    assert reason_of(data[:-500]) == "truncated"


def test_dicom_without_pixel_data_is_still_unsupported() -> None:
    assert reason_of(dicom_bytes(with_pixels=False)) == "unsupported_dicom"
