"""Decoding every supported format to uint8 gray/RGB, and every failure reason from a file that causes it."""

from __future__ import annotations

import csv
import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcovid.decode import decode, decode_path
from deepcovid.decoded import ImageInfo
from deepcovid.dicomfields import DICOM_KEYWORDS
from deepcovid.errors import REASONS, DecodeError, StorageError
from tests.fixtures.images import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    gif_bytes,
    jpeg_bytes,
    png_bytes,
    pydicom_test_file,
    shared_data_dir,
)

W, H = 48, 32  # the fixtures' default size: width 48, height 32, bright square at the top-left


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny (wrong) IDAT: a decompression bomb shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + _png_chunk(b"IEND", b"")
    )


def reason_of(data: bytes, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as caught:
        decode(data, **kwargs)  # type: ignore[arg-type]
    assert caught.value.reason in REASONS
    return caught.value.reason


# --- PNG ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("L", (H, W)), ("1", (H, W)), ("LA", (H, W)), ("RGB", (H, W, 3)), ("RGBA", (H, W, 3)), ("P", (H, W, 3))],
)
def test_png_modes_decode_to_uint8(mode: str, shape: tuple[int, ...]) -> None:
    decoded = decode(png_bytes(mode=mode))
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.shape == shape
    assert decoded.info == ImageInfo("PNG", W, H, 1 if mode == "1" else 8, mode)
    assert decoded.pixels.std() > 0


def test_one_bit_png_is_black_and_white() -> None:
    assert set(np.unique(decode(png_bytes(mode="1")).pixels)) <= {0, 255}


def test_alpha_is_composited_onto_black() -> None:
    gray = decode(png_bytes(mode="L")).pixels.astype(int)
    la = decode(png_bytes(mode="LA")).pixels.astype(int)  # left half alpha 128, right half opaque
    half = W // 2
    assert np.abs(la[:, :half] - np.rint(gray[:, :half] * 128 / 255)).max() <= 1
    assert np.array_equal(la[:, half:], gray[:, half:])
    rgba = decode(png_bytes(mode="RGBA")).pixels  # left half fully transparent
    assert rgba[:, :half].max() == 0
    assert rgba[:, half:].max() > 0


def test_gray_palette_png_stays_gray() -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(mode="L"))).convert("P").save(buf, "PNG")
    decoded = decode(buf.getvalue())
    assert decoded.pixels.shape == (H, W)
    assert decoded.info.mode == "P"


def test_16_bit_png_is_scaled_by_its_range_not_white() -> None:
    data = png_bytes(bits=16)
    # The original code's bug: Pillow's 8-bit conversion of low 16-bit values saturates to white.
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).min() == 255
    decoded = decode(data)
    assert decoded.info.bit_depth == 16
    assert decoded.pixels.shape == (H, W)
    assert decoded.pixels.std() > 20
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255
    assert (decoded.pixels < 255).mean() > 0.5
    # Same structure as the 8-bit version: the bright square is at the top-left.
    assert decoded.pixels[:4, :4].mean() > 240


def test_constant_16_bit_image_decodes_to_zeros() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(buf, "PNG")
    assert decode(buf.getvalue()).pixels.max() == 0


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "WEBP"])
def test_other_pillow_formats(fmt: str) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(mode="RGB"))).save(buf, fmt)
    decoded = decode(buf.getvalue())
    assert decoded.info.format == fmt
    assert decoded.pixels.shape == (H, W, 3)


def test_16_bit_tiff() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(buf, "TIFF")
    decoded = decode(buf.getvalue())
    assert decoded.info.bit_depth == 16
    assert decoded.pixels[0, 0] == 0 and decoded.pixels[-1, -1] == 255


# --- JPEG --------------------------------------------------------------------------------------------


def test_jpeg_gray_and_rgb() -> None:
    gray = decode(jpeg_bytes(gray=True))
    assert gray.pixels.shape == (H, W) and gray.info.mode == "L" and gray.info.format == "JPEG"
    rgb = decode(jpeg_bytes())
    assert rgb.pixels.shape == (H, W, 3) and rgb.info.mode == "RGB"


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = decode(jpeg_bytes(cmyk=True))
    assert cmyk.info.mode == "CMYK"
    assert cmyk.pixels.shape == (H, W, 3)
    rgb = decode(jpeg_bytes()).pixels.astype(int)
    assert np.abs(cmyk.pixels.astype(int) - rgb).mean() < 8


def test_exif_orientation_is_applied() -> None:
    upright = decode(jpeg_bytes(exif_orientation=1)).pixels
    assert upright.shape == (H, W, 3)
    assert upright[:6, :6].mean() > 200  # bright square top-left as stored

    rotated = decode(jpeg_bytes(exif_orientation=6))  # stored sideways: display rotates 90 degrees clockwise
    assert rotated.pixels.shape == (W, H, 3)
    assert (rotated.info.width, rotated.info.height) == (H, W)
    assert rotated.pixels[:6, -6:].mean() > 200  # top-left went to the top-right
    assert rotated.pixels[:6, :6].mean() < 150

    flipped = decode(jpeg_bytes(exif_orientation=3)).pixels  # 180 degrees
    assert flipped.shape == (H, W, 3)
    assert flipped[-6:, -6:].mean() > 200


def test_jpeg_min_side_decodes_reduced_but_reports_original_size() -> None:
    data = jpeg_bytes(size=(1600, 1200))
    full = decode(data)
    reduced = decode(data, min_side=300)
    assert full.pixels.shape == (1200, 1600, 3)
    assert reduced.pixels.shape == (300, 400, 3)  # DCT scale 1/4: shorter side still >= 300
    assert reduced.info == full.info


# --- DICOM -------------------------------------------------------------------------------------------


def test_dicom_monochrome2() -> None:
    decoded = decode(dicom_bytes())
    assert decoded.info.format == "DICOM"
    assert (decoded.info.width, decoded.info.height, decoded.info.bit_depth) == (W, H, 12)
    assert decoded.info.mode == "MONOCHROME2"
    assert decoded.pixels.shape == (H, W) and decoded.pixels.dtype == np.uint8
    assert decoded.pixels[:6, :8].mean() > 240  # high stored values display bright


def test_dicom_monochrome1_is_inverted() -> None:
    decoded = decode(dicom_bytes(photometric="MONOCHROME1"))
    assert decoded.info.mode == "MONOCHROME1"
    assert decoded.pixels[:6, :8].mean() < 15  # the same high stored values display dark
    plain = decode(dicom_bytes()).pixels.astype(int)
    assert np.array_equal(decoded.pixels.astype(int), 255 - plain)


def test_dicom_window_is_applied() -> None:
    plain = decode(dicom_bytes()).pixels
    windowed = decode(dicom_bytes(window=(1000, 500))).pixels  # stored values above 1250 saturate
    assert (windowed == 255).mean() > (plain == 255).mean() + 0.3
    assert windowed.std() > 0


def test_dicom_rescale_is_applied() -> None:
    inverted = decode(dicom_bytes(rescale=(-1.0, 4095.0))).pixels  # a negative slope flips the values
    assert inverted[:6, :8].mean() < 15
    shifted = decode(dicom_bytes(rescale=(2.0, -1000.0))).pixels  # linear: same image after min..max
    assert np.abs(shifted.astype(int) - decode(dicom_bytes()).pixels.astype(int)).max() <= 1


def test_dicom_bits_stored_and_signed() -> None:
    decoded = decode(dicom_bytes(bits_stored=10, signed=True))
    assert decoded.info.bit_depth == 10
    assert decoded.pixels[:6, :8].mean() > 240
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_dicom_bits_stored_masks_unused_high_bits() -> None:
    # BitsStored 12 in 16-bit words: garbage in the top 4 bits must not reach the image.
    stored = np.zeros((H, W), np.uint16)
    stored[:, W // 2 :] = 4095
    stored |= 0xF000  # overlay bits set everywhere
    decoded = decode(dicom_bytes(pixels=stored, bits_stored=12))
    assert decoded.pixels[:, : W // 2].max() == 0
    assert decoded.pixels[:, W // 2 :].min() == 255


def test_dicom_rgb() -> None:
    decoded = decode(dicom_bytes(photometric="RGB"))
    assert decoded.pixels.shape == (H, W, 3) and decoded.info.mode == "RGB"


def test_dicom_keeps_uids_but_never_patient_identity() -> None:
    info = decode(dicom_bytes()).info
    assert info.dicom is not None
    assert set(info.dicom) == set(DICOM_KEYWORDS)
    assert info.dicom["Modality"] == "DX" and info.dicom["ViewPosition"] == "PA"
    assert info.dicom["BodyPartExamined"] == "CHEST"
    text = repr(info.as_dict())
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, "19700101"):
        assert secret not in text


@pytest.mark.parametrize(
    ("name", "syntax", "shape"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, YBR_FULL", (100, 100, 3)),
        ("SC_rgb_jpeg.dcm", "JPEG baseline, RGB", (256, 256, 3)),
        ("JPGExtended.dcm", "JPEG extended 12-bit", (1024, 256)),
        ("SC_rgb_jpeg_gdcm.dcm", "JPEG lossless SV1", (100, 100, 3)),
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless", (64, 64)),
        ("JPEGLSNearLossless_16.dcm", "JPEG-LS near-lossless", (50, 10)),
        ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless", (64, 64)),
        ("693_J2KI.dcm", "JPEG 2000 lossy, rescale + window", (512, 512)),
        ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 lossless, YBR_RCT", (400, 400, 3)),
        ("MR_small_RLE.dcm", "RLE lossless", (64, 64)),
        ("SC_rgb_rle_16bit.dcm", "RLE lossless, 16-bit RGB", (100, 100, 3)),
        ("image_dfl.dcm", "deflated explicit VR", (512, 512)),
        ("MR_small_bigendian.dcm", "explicit VR big endian", (64, 64)),
        ("examples_palette.dcm", "palette colour", (350, 800, 3)),
    ],
)
def test_compressed_dicom_test_files(name: str, syntax: str, shape: tuple[int, ...]) -> None:
    decoded = decode(pydicom_test_file(name))  # Modality rewritten to OT, pixel data untouched
    assert decoded.pixels.shape == shape, syntax
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.std() > 0.5, syntax  # SC_rgb_jpeg is nearly uniform


def test_dicom_lossless_codecs_agree() -> None:
    """JPEG-LS, JPEG 2000 and RLE copies of MR_small must decode to the same pixels."""
    results = [
        decode(pydicom_test_file(n)).pixels
        for n in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm")
    ]
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_ybr_jpeg_dicom_is_converted_to_rgb() -> None:
    pixels = decode(pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm")).pixels
    red = pixels[5, 50]  # this sample's top band is pure red
    assert red[0] > 200 and red[1] < 40 and red[2] < 40


@pytest.mark.parametrize(
    ("data_factory", "detail"),
    [
        (lambda: dicom_bytes(frames=3), "multi-frame"),
        (lambda: pydicom_test_file("SC_rgb_rle_2frame.dcm"), "multi-frame"),
        (lambda: dicom_bytes(with_pixels=False), "no pixel data"),
        (lambda: pydicom_test_file("rtplan.dcm", modality=None), "no pixel data"),
        (lambda: dicom_bytes(modality="CT"), "CT"),
        (lambda: pydicom_test_file("CT_small.dcm", modality=None), "CT"),
        (lambda: pydicom_test_file("MR_small.dcm", modality=None), "MR"),
        (lambda: dicom_bytes(modality="US"), "US"),
        (lambda: dicom_bytes(modality="MG"), "MG"),
        (lambda: dicom_bytes(modality=None), "missing"),
    ],
)
def test_refused_dicom(data_factory, detail: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DecodeError) as caught:
        decode(data_factory())
    assert caught.value.reason == "unsupported_dicom"
    assert detail in caught.value.detail


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG", "OT"])
def test_accepted_projection_modalities(modality: str) -> None:
    assert decode(dicom_bytes(modality=modality)).info.dicom["Modality"] == modality  # type: ignore[index]


def test_non_dicom_is_never_parsed_as_dicom() -> None:
    # A file that holds a DICOM data set but no Part 10 preamble/'DICM' marker is refused, not guessed.
    data = dicom_bytes()[132:]
    assert reason_of(data, name="x.dcm") == "not_an_image"
    # Text that merely contains 'DICM' somewhere else is not DICOM either.
    assert reason_of(b"DICM" + b"x" * 300) == "not_an_image"


# --- failure reasons ---------------------------------------------------------------------------------


def test_empty_file() -> None:
    assert reason_of(b"") == "empty_file"


def test_not_an_image() -> None:
    assert reason_of(b"patient,label\nx,covid\n" * 20) == "not_an_image"
    assert reason_of(b"%PDF-1.4\n" + b"0" * 500) == "not_an_image"
    # EPS would run Ghostscript: never even tried.
    assert reason_of(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" + b" " * 200) == "not_an_image"


@pytest.mark.parametrize(
    "data_factory",
    [
        lambda: png_bytes(size=300)[:2000],
        lambda: png_bytes(size=300)[:20],
        lambda: jpeg_bytes(size=300)[:3000],
        lambda: dicom_bytes(size=(200, 100))[:-40],
    ],
)
def test_truncated(data_factory) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(data_factory()) == "truncated"


def test_corrupt_png_stream() -> None:
    data = bytearray(png_bytes(size=200))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = b"\xff" * 40
    assert reason_of(bytes(data)) == "corrupt"


def test_corrupt_compressed_dicom() -> None:
    assert reason_of(pydicom_test_file("JPEG2000-embedded-sequence-delimiter.dcm")) == "corrupt"


def test_codec_panic_is_a_decode_error() -> None:
    """pylibjpeg-rle (Rust) panics on this damaged RLE header: pyo3's PanicException is no Exception."""
    data = bytearray(pydicom_test_file("MR_small_RLE.dcm"))
    data[data.rfind(b"\xe0\x7f\x10\x00") + 40] = 104
    with pytest.raises(DecodeError) as caught:
        decode(bytes(data))
    assert caught.value.reason == "corrupt"
    assert "PanicException" in caught.value.detail


def test_too_large_by_max_pixels() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(png_bytes(size=(48, 32)), max_pixels=1000)
    assert caught.value.reason == "too_large"
    assert "48x32" in caught.value.detail
    assert reason_of(dicom_bytes(size=(48, 32)), max_pixels=1000) == "too_large"
    assert reason_of(jpeg_bytes(size=(48, 32)), max_pixels=1000) == "too_large"


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9_000, 9_000)])
def test_decompression_bomb_header_refused_fast(width: int, height: int) -> None:
    """Refused from the header alone: 10^10 is past Pillow's own guard, 81M only past ours (64M)."""
    start = time.perf_counter()
    assert reason_of(png_header_only(width, height)) == "too_large"
    assert time.perf_counter() - start < 1.0


def test_decompression_bomb_dicom_header_refused_before_pixels() -> None:
    data = bytearray(dicom_bytes(size=(8, 8)))
    # Rows (0028,0010) US 8 -> 60000 and Columns (0028,0011) -> 60000; the pixel data stays 128 bytes.
    for tag in (b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x11\x00US\x02\x00"):
        at = data.index(tag) + len(tag)
        data[at : at + 2] = struct.pack("<H", 60000)
    assert reason_of(bytes(data)) == "too_large"


def test_animated_gif_is_refused_single_frame_gif_decodes() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(gif_bytes(frames=3))
    assert caught.value.reason == "unsupported_image"
    assert "3 frames" in caught.value.detail
    assert decode(gif_bytes(frames=1)).pixels.shape == (32, 32)


def test_animated_png_is_refused() -> None:
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (0, 128)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert reason_of(buf.getvalue()) == "unsupported_image"


# --- decode_path -------------------------------------------------------------------------------------


def test_decode_path_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    assert decode_path(path).info.format == "PNG"


def storage_reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(StorageError) as caught:
        decode_path(path, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_decode_path_storage_errors(tmp_path: Path) -> None:
    assert storage_reason(tmp_path / "missing.png") == "not_found"
    assert storage_reason(tmp_path) == "is_a_directory"
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes())
    assert storage_reason(big, max_bytes=100) == "too_large"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_decode_path_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(png_bytes())
    path.chmod(0)
    try:
        assert storage_reason(path) == "permission_denied"
    finally:
        path.chmod(0o600)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_decode_path_unreadable() -> None:
    # Opening succeeds, reading fails with EIO: the shape of a failing disk or a stale network mount.
    assert storage_reason(Path("/proc/self/mem")) == "unreadable"


def test_decode_path_decode_errors_stay_decode_errors(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DecodeError) as caught:
        decode_path(path)
    assert caught.value.reason == "empty_file"


# --- real data ---------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_shared_cxr_pngs_all_decode() -> None:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not present")
    with (root / "cxr" / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 755
    for row in rows:
        decoded = decode_path(root / "cxr" / row["filename"])
        assert decoded.pixels.dtype == np.uint8
        assert (decoded.info.width, decoded.info.height) == (
            int(row["stored_width"]),
            int(row["stored_height"]),
        ), row["filename"]
        assert decoded.info.format == "PNG"


@pytest.mark.shared_data
def test_shared_dicom_files_decode_except_the_malformed_one() -> None:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not present")
    for name in ("966_fixed.dcm", "RG1_J2KI.dcm", "RG1_JLSN.dcm"):
        decoded = decode_path(root / "dicom" / name)
        assert decoded.info.format == "DICOM" and decoded.info.mode == "MONOCHROME1"
        assert decoded.info.dicom and decoded.info.dicom["BodyPartExamined"] == "CHEST"
        pixels = decoded.pixels
        assert pixels.std() > 20
        # Inverted correctly: the lungs (middle of each half) are darker than the mediastinum.
        h, w = pixels.shape
        lungs = (
            pixels[h // 3 : h // 2, w // 5 : w // 3].mean()
            + pixels[h // 3 : h // 2, 2 * w // 3 : 4 * w // 5].mean()
        ) / 2
        mediastinum = pixels[h // 3 : h // 2, 9 * w // 20 : 11 * w // 20].mean()
        assert lungs < mediastinum, name
    with pytest.raises(DecodeError) as caught:
        decode_path(root / "dicom" / "966.dcm")
    assert caught.value.reason == "corrupt"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": (1500.0, 1200.0)},
        {"signed": True, "rescale": (1.0, -1024.0), "window": (40.0, 400.0)},
        {"rescale": (0.37, 12.5)},
        {"photometric": "MONOCHROME1", "window": (2048.0, 4096.0)},
        {"bits_stored": 16, "window": (30000.0, 20000.0)},
        {"pixels": np.full((32, 48), 700, dtype=np.uint16)},
    ],
    ids=[
        "plain",
        "window",
        "signed-rescale-window",
        "fractional-rescale",
        "monochrome1",
        "16-bit",
        "constant",
    ],
)
def test_16_bit_dicom_lookup_table_matches_the_float_path(options: dict[str, object]) -> None:
    """The one-lookup-table path for 16-bit DICOM pixels gives exactly the per-pixel float64 result."""
    from pydicom import dcmread

    from deepcovid.dicom import _display_values, _integer_pixels_to_uint8
    from deepcovid.pixels import scale_to_uint8

    ds = dcmread(io.BytesIO(dicom_bytes(size=(48, 32), **options)))  # type: ignore[arg-type]
    arr = ds.pixel_array
    assert arr.dtype.itemsize == 2
    np.testing.assert_array_equal(_integer_pixels_to_uint8(arr, ds), scale_to_uint8(_display_values(arr, ds)))
