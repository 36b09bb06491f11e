"""Decoding is bounded: the bytes an image would hold are checked from its header, decode threads share one
byte budget, and the 8-bit conversion works in bands of rows, giving exactly the whole-image result."""

from __future__ import annotations

import io
import logging
import threading
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

import deepcovid.pixels
from deepcovid.codestream import FrameSize, declared_size
from deepcovid.decode import decode
from deepcovid.errors import DecodeError
from deepcovid.limits import DECODING, ByteBudget
from deepcovid.settings import Settings
from tests.fixtures.faults import j2k_codestream_declaring, j2k_dicom_declaring, rle_dicom_declaring
from tests.fixtures.images import dicom_bytes, jpeg_bytes, png_bytes, pydicom_test_file

W, H = 48, 32


def refusal(data: bytes, **kwargs: object) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(data, **kwargs)  # type: ignore[arg-type]
    return caught.value


def encoded(array: np.ndarray, fmt: str, mode: str | None = None, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt, **options)
    return buffer.getvalue()


# --- the header check --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_factory", "decoded_bytes"),
    [
        (lambda: png_bytes(mode="L"), W * H),  # one byte per pixel
        (lambda: png_bytes(mode="RGB"), W * H * 4),  # Pillow holds RGB in four bytes
        (lambda: png_bytes(mode="P"), W * H * 3),  # a palette is expanded to RGB
        (lambda: png_bytes(bits=16), W * H * 2),
        (lambda: jpeg_bytes(gray=True), W * H),
        (lambda: dicom_bytes(), W * H * 2),  # BitsAllocated 16
        (lambda: dicom_bytes(photometric="RGB"), W * H * 3),
    ],
)
def test_decoded_bytes_are_checked_from_the_header(
    data_factory: Callable[[], bytes], decoded_bytes: int
) -> None:
    data = data_factory()
    assert decode(data, max_decoded_bytes=decoded_bytes).pixels.shape[:2] == (H, W)
    error = refusal(data, max_decoded_bytes=decoded_bytes - 1)
    assert error.reason == "too_large"
    assert f"decodes to {decoded_bytes} bytes" in error.detail
    assert "DEEPCOVID_MAX_DECODED_BYTES" in error.detail


def test_jpeg_2000_counts_its_codec_s_32_bit_samples() -> None:
    data = j2k_dicom_declaring(64, components=1, precision=16)
    assert decode(data, max_decoded_bytes=64 * 64 * 4).pixels.shape == (64, 64)
    assert refusal(data, max_decoded_bytes=64 * 64 * 4 - 1).reason == "too_large"


def test_a_bomb_is_refused_before_any_pixel_is_decoded() -> None:
    """768 MB declared by 12 MB of RLE: refused without touching the pixel data (numpy allocates nothing)."""
    data = rle_dicom_declaring()
    tracemalloc.start()
    try:
        error = refusal(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.reason == "too_large"
    assert "768000000 bytes" in error.detail
    assert peak < 2 * len(data) + (8 << 20)  # the header parse copies the pixel data bytes once


def test_a_compressed_frame_larger_than_its_header_is_refused_as_corrupt() -> None:
    """A DICOM that says 64 x 64 around a JPEG 2000 frame declaring 8000 x 8000: the codec would allocate
    the frame's size and pydicom then refuse it, so the mismatch is refused before decoding."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(j2k_dicom_declaring(64)))
    ds.PixelData = encapsulate([j2k_codestream_declaring(8000, 8000)])  # 256 MB: within the byte limit
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    error = refusal(buffer.getvalue())
    assert error.reason == "corrupt"
    assert "8000x8000" in error.detail and "64x64" in error.detail


@pytest.mark.parametrize(
    ("data_factory", "expected"),
    [
        (lambda: j2k_codestream_declaring(300, 200, components=3, precision=12), FrameSize(300, 200, 3, 12)),
        (lambda: jpeg_bytes(size=(300, 200)), FrameSize(300, 200, 3, 8)),
        (lambda: jpeg_bytes(size=(300, 200), gray=True), FrameSize(300, 200, 1, 8)),
        (lambda: b"\x00" * 64, None),
        (lambda: b"\xff\xd8\xff\xe0\x00", None),  # cut inside the first segment
    ],
)
def test_declared_size_of_a_codestream(data_factory: Callable[[], bytes], expected: FrameSize | None) -> None:
    assert declared_size(data_factory()) == expected


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_MAX_DECODED_BYTES", "1000")
    assert Settings().max_decoded_bytes == 1000


# --- the budget shared by decode threads ----------------------------------------------------------


def test_budget_waits_until_the_bytes_fit() -> None:
    budget = ByteBudget()
    first_in, second_in, release_first = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with budget.hold(60, 100):
            first_in.set()
            release_first.wait(10)

    def second() -> None:
        with budget.hold(60, 100):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert not second_in.wait(0.2)  # 60 + 60 > 100: it waits while the first holds its bytes
    assert budget.held == 60
    release_first.set()
    assert second_in.wait(10)
    for thread in threads:
        thread.join(10)
    assert budget.held == 0


def test_budget_never_exceeded_by_many_threads() -> None:
    budget = ByteBudget()
    seen: list[int] = []
    lock = threading.Lock()

    def work(nbytes: int) -> None:
        for _ in range(50):
            with budget.hold(nbytes, 100), lock:
                seen.append(budget.held)

    threads = [threading.Thread(target=work, args=(n,)) for n in (10, 30, 45, 60, 90, 100, 25, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(seen) == 8 * 50
    assert max(seen) <= 100
    assert budget.held == 0


def test_an_image_alone_always_proceeds() -> None:
    budget = ByteBudget()
    with budget.hold(500, 100):  # the header check refuses such images first; the budget never deadlocks
        assert budget.held == 500
    assert budget.held == 0


def test_transform_runs_while_the_bytes_are_held() -> None:
    held: list[int] = []

    def transform(pixels: np.ndarray) -> np.ndarray:
        held.append(DECODING.held)
        return pixels[:1]

    for data in (png_bytes(mode="RGB"), dicom_bytes()):
        assert decode(data, transform=transform).pixels.shape[0] == 1
    assert held == [W * H * 4, W * H * 2]
    assert DECODING.held == 0


def test_budget_released_when_decoding_fails() -> None:
    data = bytearray(png_bytes(size=200))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = b"\xff" * 40
    assert refusal(bytes(data)).reason == "corrupt"
    assert DECODING.held == 0


# --- band-wise conversion -------------------------------------------------------------------------

RNG = np.random.default_rng(7)
NOISE = RNG.normal(size=(97, 131)).astype(np.float32)
NOISE[3, 4], NOISE[5, 6] = np.nan, np.inf

BANDED_INPUTS: dict[str, Callable[[], bytes]] = {
    "gray": lambda: png_bytes(mode="L", size=300),
    "bilevel": lambda: png_bytes(mode="1", size=300),
    "gray-alpha": lambda: png_bytes(mode="LA", size=300),
    "rgba": lambda: png_bytes(mode="RGBA", size=300),
    "palette": lambda: png_bytes(mode="P", size=300),
    "16-bit": lambda: png_bytes(bits=16, size=300),
    "cmyk": lambda: jpeg_bytes(cmyk=True, size=300),
    "float-with-nan": lambda: encoded(NOISE, "TIFF"),
    "int32": lambda: encoded(RNG.integers(-(10**6), 10**6, (97, 131), dtype=np.int32), "TIFF"),
    "dicom-window": lambda: dicom_bytes(size=(131, 97), window=(1000.0, 500.0)),
    "dicom-8-bit-rescaled": lambda: dicom_bytes(size=(131, 97), bits_stored=8, rescale=(0.37, 12.5)),
    "dicom-monochrome1": lambda: dicom_bytes(size=(131, 97), photometric="MONOCHROME1"),
    "dicom-rgb": lambda: dicom_bytes(size=(131, 97), photometric="RGB"),
    "dicom-palette": lambda: pydicom_test_file("examples_palette.dcm"),
    "dicom-ybr-jpeg": lambda: pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm"),
    "dicom-rle-16-bit-rgb": lambda: pydicom_test_file("SC_rgb_rle_16bit.dcm"),
}


@pytest.mark.parametrize("name", list(BANDED_INPUTS))
def test_bands_of_any_size_give_the_same_pixels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = BANDED_INPUTS[name]()
    whole = decode(data).pixels  # these images fit in one band
    monkeypatch.setattr(deepcovid.pixels, "BAND_SAMPLES", 97)  # a band of a row or two
    banded = decode(data).pixels
    assert banded.dtype == whole.dtype and banded.shape == whole.shape
    np.testing.assert_array_equal(banded, whole)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    data = jpeg_bytes(exif_orientation=orientation, size=(61, 37))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode(data)
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.pixels.flags.c_contiguous
    assert (decoded.info.width, decoded.info.height) == (expected.shape[1], expected.shape[0])


NO_FLOAT_COPY: dict[str, tuple[Callable[[], bytes], float]] = {
    # name: (file, most bytes numpy and Python may hold per output sample while decoding it)
    "float-tiff": (lambda: encoded(RNG.normal(size=(512, 512)).astype(np.float32), "TIFF"), 3),
    "int32-tiff": (lambda: encoded(RNG.integers(-(10**6), 10**6, (512, 512), dtype=np.int32), "TIFF"), 3),
    "rgba-png": (lambda: encoded(RNG.integers(0, 255, (512, 512, 4), dtype=np.uint8), "PNG", "RGBA"), 3),
    "gray-alpha-png": (lambda: encoded(RNG.integers(0, 255, (512, 512, 2), dtype=np.uint8), "PNG", "LA"), 3),
    "8-bit-dicom-rescaled": (lambda: dicom_bytes(size=512, bits_stored=8, rescale=(0.37, 12.5)), 5),
    # pydicom itself holds the stored bytes about three times (6 bytes); bincount's int64 copy was 8 more.
    "16-bit-dicom-windowed": (lambda: dicom_bytes(size=2048, bits_stored=12, window=(1000.0, 500.0)), 8),
}


@pytest.mark.parametrize("name", list(NO_FLOAT_COPY))
def test_no_full_size_float_or_int64_copy(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's and Python's allocations are traced: a float64 copy alone would be 8 bytes per sample."""
    factory, bytes_per_sample = NO_FLOAT_COPY[name]
    data = factory()
    monkeypatch.setattr(deepcovid.pixels, "BAND_SAMPLES", 4096)  # bands far smaller than the image
    tracemalloc.start()
    try:
        pixels = decode(data).pixels
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bytes_per_sample * pixels.size, f"{peak / pixels.size:.2f} bytes per sample"


def test_a_corrupt_compressed_dicom_logs_no_pydicom_traceback(caplog: pytest.LogCaptureFixture) -> None:
    from deepcovid.errors import DecodeError
    from tests.fixtures.faults import broken_compressed_dicom

    with caplog.at_level(logging.INFO), pytest.raises(DecodeError) as caught:
        decode(broken_compressed_dicom())
    assert caught.value.reason in ("corrupt", "truncated")
    assert [r for r in caplog.records if r.name.startswith("pydicom") and r.exc_info] == []
