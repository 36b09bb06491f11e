"""Preprocessing matches torchvision's Resize(224)+CenterCrop(224)+ToTensor+Normalize, fast path included."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from deepcovid.batches import collate, normalize
from deepcovid.decode import decode, decode_path
from deepcovid.errors import DecodeError
from deepcovid.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SIZE,
    load_image,
    resized_size,
    to_model_input,
)
from tests.fixtures.images import dicom_bytes, jpeg_bytes, make_xray, shared_data_dir

# Tolerances of the fast path (JPEG DCT-scaled decode, box reduce) against the plain reference.
# Measured on FAST_CASES: PNG/16-bit/DICOM mean |diff| of normalised tensors < 0.0001 and uint8 max
# |diff| <= 1 (2 on a 2048x1700 PNG); DCT-scaled JPEG mean 0.005, uint8 99th percentile 2, max 7
# (single pixels at hard synthetic edges).
MEAN_ABS_TOLERANCE = 0.01
UINT8_P99_TOLERANCE = 2
UINT8_MAX_TOLERANCE = 8

REFERENCE = T.Compose(
    [T.Resize(INPUT_SIZE), T.CenterCrop(INPUT_SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
)


def encode(pixels: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


def reference(pixels: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The paper's torchvision pipeline on the fully decoded image: normalised tensor and uint8 crop."""
    image = Image.fromarray(pixels).convert("RGB")
    crop = T.CenterCrop(INPUT_SIZE)(T.Resize(INPUT_SIZE)(image))
    return REFERENCE(image)[None], np.asarray(crop)


def as_rgb(image: np.ndarray) -> np.ndarray:
    return np.asarray(collate([image])[0].permute(1, 2, 0))


def test_constants() -> None:
    assert INPUT_SIZE == 224
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(448, 300, (334, 224)), (300, 448, (224, 334)), (224, 224, (224, 224)), (100, 50, (448, 224))],
)
def test_resized_size_matches_torchvision(width: int, height: int, expected: tuple[int, int]) -> None:
    assert resized_size(width, height) == expected
    assert T.Resize(INPUT_SIZE)(Image.new("L", (width, height))).size == expected


@pytest.mark.parametrize("shape", [(300, 500), (777, 1023), (100, 150), (224, 224), (1200, 900, 3)])
def test_to_model_input_matches_torchvision(shape: tuple[int, ...]) -> None:
    pixels = make_xray((shape[1], shape[0]), True, seed=1)
    if len(shape) == 3:
        pixels = np.dstack([pixels, 255 - pixels, pixels // 2])
    out = to_model_input(pixels)
    assert out.dtype == np.uint8
    assert out.shape == ((224, 224) if len(shape) == 2 else (224, 224, 3))
    expected_tensor, expected_uint8 = reference(pixels)
    assert np.abs(as_rgb(out).astype(int) - expected_uint8.astype(int)).max() <= 1
    assert (normalize(collate([out])) - expected_tensor).abs().max() < 0.02  # one uint8 step is 0.0175


def test_to_model_input_rejects_other_arrays() -> None:
    with pytest.raises(ValueError):
        to_model_input(np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((10, 10, 4), np.uint8))


FAST_CASES = {
    "png 1400x1100": lambda: encode(make_xray((1400, 1100), True, 3), "PNG"),
    "jpeg 1400x1100 (DCT 1/2)": lambda: encode(make_xray((1400, 1100), True, 3), "JPEG", quality=90),
    "jpeg rgb 2000x1800 (DCT 1/4)": lambda: jpeg_bytes(
        size=(2000, 1800), pixels=make_xray((2000, 1800), False, 1)
    ),
    "png16 900x900": lambda: encode(make_xray(900, True, 2).astype(np.uint16) * 64 + 100, "PNG"),
    "dicom 12-bit 1000x1200": lambda: dicom_bytes(size=(1000, 1200), photometric="MONOCHROME1"),
    "png 300x200": lambda: encode(make_xray((300, 200), True, 4), "PNG"),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_path_matches_plain_reference(case: str) -> None:
    data = FAST_CASES[case]()
    expected_tensor, expected_uint8 = reference(decode(data).pixels)
    image, info = load_image(data)
    assert image.shape == (224, 224) or image.shape == (224, 224, 3)
    assert info == decode(data).info
    fast = normalize(collate([image]))
    assert (fast - expected_tensor).abs().mean().item() < MEAN_ABS_TOLERANCE
    diff = np.abs(as_rgb(image).astype(int) - expected_uint8.astype(int))
    assert np.percentile(diff, 99) <= UINT8_P99_TOLERANCE
    assert diff.max() <= UINT8_MAX_TOLERANCE


def test_load_image_raises_only_decode_error() -> None:
    with pytest.raises(DecodeError) as caught:
        load_image(b"not an image at all, just text" * 10)
    assert caught.value.reason == "not_an_image"
    with pytest.raises(DecodeError) as caught:
        load_image(encode(make_xray(64), "PNG"), max_pixels=100)
    assert caught.value.reason == "too_large"


def test_collate_repeats_gray_and_keeps_rgb() -> None:
    gray = np.arange(224 * 224, dtype=np.uint32).reshape(224, 224).astype(np.uint8)
    rgb = np.dstack([gray, 255 - gray, np.zeros_like(gray)])
    batch = collate([gray, rgb])
    assert batch.dtype == torch.uint8
    assert batch.shape == (2, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        assert torch.equal(batch[0, c], torch.from_numpy(gray))
        assert torch.equal(batch[1, c], torch.from_numpy(np.ascontiguousarray(rgb[:, :, c])))
    assert collate([]).shape == (0, 3, 224, 224)
    with pytest.raises(ValueError):
        collate([np.zeros((100, 100), np.uint8)])


def test_normalize_is_imagenet_normalisation_in_channels_last_float32() -> None:
    batch = collate([np.full((224, 224), v, np.uint8) for v in (0, 128, 255)])
    out = normalize(batch)
    assert out.dtype == torch.float32
    assert out.shape == (3, 3, 224, 224)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.device == batch.device
    for i, v in enumerate((0, 128, 255)):
        for c in range(3):
            expected = (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert torch.allclose(out[i, c], torch.full((224, 224), expected), atol=1e-5)
    assert batch.dtype == torch.uint8  # the input is left alone


def test_normalize_matches_torchvision_on_a_real_looking_image() -> None:
    image = to_model_input(make_xray(300, True, 5))
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(Image.fromarray(image).convert("RGB")))
    assert torch.allclose(normalize(collate([image]))[0], expected, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_stays_on_the_gpu() -> None:
    batch = collate([to_model_input(make_xray(256, True, 0))]).to("cuda")
    out = normalize(batch)
    assert out.device == batch.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.cpu(), normalize(batch.cpu()), atol=1e-5)


@pytest.mark.shared_data
def test_fast_path_on_real_images() -> None:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not present")
    for path in (
        root / "cxr" / "covid" / "ieee8023__01E392EE-69F9-4E33-BFCE-E5C968654078.png",  # 1989x1482
        root / "dicom" / "RG1_JLSN.dcm",
    ):
        data = path.read_bytes()
        expected_tensor, expected_uint8 = reference(decode_path(path).pixels)
        image, _ = load_image(data)
        assert (normalize(collate([image])) - expected_tensor).abs().mean().item() < MEAN_ABS_TOLERANCE
        assert np.abs(as_rgb(image).astype(int) - expected_uint8.astype(int)).max() <= UINT8_MAX_TOLERANCE
