"""Overlay geometry: a map lands on the original image where the networks saw it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcovid.decode import decode
from deepcovid.ensemble import Ensemble
from deepcovid.explain import CropGeometry, explain_bytes
from deepcovid.overlay import LEGEND_HEIGHT, crop_in_display, display_size, overlay_png, render_overlay
from deepcovid.preprocess import INPUT_SIZE, load_image, to_model_input
from tests.fixtures.images import dicom_bytes, jpeg_bytes

GRAY = 128


def _spot(x: int, y: int) -> np.ndarray:
    """A 224x224 map that is hot only around (x, y)."""
    yy, xx = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 18.0).astype(np.float32)


def _hottest(image: Image.Image, drawn: tuple[int, int]) -> tuple[int, int]:
    """(x, y) of the drawn image's pixel that differs most from plain gray (the legend left out)."""
    pixels = np.asarray(image, dtype=np.float32)[: drawn[1], : drawn[0]]
    change = np.abs(pixels - GRAY).sum(axis=2)
    y, x = np.unravel_index(np.argmax(change), change.shape)
    return int(x), int(y)


@pytest.mark.parametrize("size", [(300, 500), (500, 300), (2400, 1600), (224, 224)])
def test_a_hot_spot_lands_where_the_crop_put_it(size: tuple[int, int]) -> None:
    width, height = size
    geometry = CropGeometry.for_size(width, height)
    pixels = np.full((height, width), GRAY, np.uint8)
    image = render_overlay(pixels, _spot(190, 30), geometry)
    drawn = display_size(width, height)
    assert image.size == (drawn[0], drawn[1] + LEGEND_HEIGHT)
    assert max(drawn) <= 1024
    x, y = _hottest(image, drawn)
    expected_x, expected_y = geometry.to_original(190, 30)
    scale = drawn[0] / width
    slack = 1 / geometry.scale + 2 / scale  # one map pixel and two drawn pixels, in original pixels
    assert abs(x / scale - expected_x) <= slack and abs(y / scale - expected_y) <= slack


@pytest.mark.parametrize("size", [(300, 500), (500, 300)])
def test_outside_the_crop_the_image_is_shown_without_heat(size: tuple[int, int]) -> None:
    width, height = size
    geometry = CropGeometry.for_size(width, height)
    pixels = np.full((height, width), GRAY, np.uint8)
    image = np.asarray(render_overlay(pixels, np.ones((INPUT_SIZE, INPUT_SIZE), np.float32), geometry))
    left, top, right, bottom = crop_in_display(geometry, (width, height))
    outside = np.ones((height, width), bool)
    outside[top:bottom, left:right] = False
    assert outside.any() and (image[:height][outside] == GRAY).all()
    assert (image[top:bottom, left:right] != GRAY).any(axis=2).all()


@pytest.mark.parametrize("size", [(300, 500), (500, 300), (1000, 700)])
def test_the_geometry_is_the_crop_the_networks_see(size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(1)
    pixels = np.asarray(
        Image.fromarray(rng.integers(0, 255, (height // 10, width // 10), dtype=np.uint8)).resize(size)
    )
    geometry = CropGeometry.for_size(width, height)
    crop = Image.fromarray(pixels).resize(
        (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, box=geometry.box
    )
    np.testing.assert_array_equal(np.asarray(crop), to_model_input(pixels))
    assert geometry.scale == pytest.approx(INPUT_SIZE / min(width, height))
    assert geometry.to_original(0, 0) == pytest.approx(geometry.box[:2])
    assert geometry.to_original(INPUT_SIZE, INPUT_SIZE) == pytest.approx(geometry.box[2:])


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_bundle_path: Path) -> Ensemble:
    return Ensemble.from_bundle(tiny_bundle_path, device="cpu", precision="fp32")


def _matches_model_input(data: bytes, pixels: np.ndarray, geometry: CropGeometry) -> None:
    """The geometry's box on the displayed image holds what the networks were given (same orientation)."""
    model_input, _ = load_image(data)
    shown = Image.fromarray(pixels).resize(
        (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR, box=geometry.box
    )
    difference = np.abs(np.asarray(shown, np.float32) - np.asarray(model_input, np.float32))
    assert difference.mean() < 4


def test_an_exif_rotated_jpeg_is_drawn_as_displayed(tiny_ensemble: Ensemble) -> None:
    """Stored 300 wide and 500 high with its bright square top-left; orientation 6 turns it clockwise."""
    data = jpeg_bytes(size=(300, 500), exif_orientation=6, gray=True)
    explained = explain_bytes(tiny_ensemble, data)
    assert explained.pixels.shape == (300, 500)
    assert (explained.geometry.width, explained.geometry.height) == (500, 300)
    _matches_model_input(data, explained.pixels, explained.geometry)
    png = overlay_png(explained.pixels, explained.explanation.maps["ensemble"], explained.geometry)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert image.shape == (300 + LEGEND_HEIGHT, 500)
    assert image[5, 495] > 200 and image[5, 5] < 200  # the square is top-right once rotated, outside the crop


def test_a_monochrome1_dicom_is_drawn_inverted(tiny_ensemble: Ensemble) -> None:
    data = dicom_bytes(photometric="MONOCHROME1", size=(400, 300))
    explained = explain_bytes(tiny_ensemble, data)
    displayed = decode(data).pixels
    np.testing.assert_array_equal(explained.pixels, displayed)
    assert displayed[5, 5] < 60  # the stored bright square reads dark
    _matches_model_input(data, explained.pixels, explained.geometry)
    png = overlay_png(explained.pixels, explained.explanation.maps["ensemble"], explained.geometry)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert image.shape == (300 + LEGEND_HEIGHT, 400)
    assert abs(int(image[5, 5]) - int(displayed[5, 5])) <= 2  # outside the crop: the image as displayed
