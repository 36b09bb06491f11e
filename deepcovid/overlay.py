"""An explanation map drawn on the original image as a reader sees it, with a colour legend, as PNG.

The image is the decoder's display pixels (EXIF orientation applied, MONOCHROME1 inverted), shrunk to a
bounded size; the map covers only the centre crop the networks saw, and outside it the image is shown
without heat, so nobody reads an explanation into pixels no network looked at.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from deepcovid import defaults
from deepcovid.explain import CropGeometry

COLOUR_MAP = "jet"
HEAT_ALPHA = 0.45  # how much of a fully hot pixel is colour rather than image
LEGEND_HEIGHT = 36


def display_size(width: int, height: int, max_side: int = defaults.OVERLAY_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the drawn image: the original, shrunk (never enlarged) to ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def crop_in_display(geometry: CropGeometry, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop box of ``geometry`` in the pixels of an image drawn at ``size``."""
    sx, sy = size[0] / geometry.width, size[1] / geometry.height
    left, top, right, bottom = geometry.box
    return round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)


def render_overlay(
    pixels: np.ndarray,
    heat: np.ndarray,
    geometry: CropGeometry,
    *,
    caption: str = "",
    max_side: int = defaults.OVERLAY_MAX_SIDE,
) -> Image.Image:
    """``heat`` (224x224 in [0, 1]) over ``pixels`` (uint8 HxW or HxWx3, as displayed), legend below."""
    import matplotlib

    height, width = pixels.shape[:2]
    if (width, height) != (geometry.width, geometry.height):
        expected = f"{geometry.width}x{geometry.height}"
        raise ValueError(f"pixels are {width}x{height}, the geometry is for {expected}")
    size = display_size(width, height, max_side)
    base = Image.fromarray(pixels).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    canvas = np.asarray(base, dtype=np.float32).copy()
    left, top, right, bottom = crop_in_display(geometry, size)
    box_w, box_h = max(1, right - left), max(1, bottom - top)
    scaled = Image.fromarray(np.clip(heat, 0, 1).astype(np.float32), mode="F").resize(
        (box_w, box_h), Image.Resampling.BILINEAR
    )
    values = np.clip(np.asarray(scaled), 0.0, 1.0)
    colours = matplotlib.colormaps[COLOUR_MAP](values)[..., :3] * 255.0
    alpha = HEAT_ALPHA * values[..., None]
    region = canvas[top : top + box_h, left : left + box_w]
    h, w = region.shape[:2]  # a crop rounded past the edge keeps to the image
    region[:] = (1 - alpha[:h, :w]) * region + alpha[:h, :w] * colours[:h, :w]
    image = Image.fromarray(canvas.round().astype(np.uint8))
    return _with_legend(image, caption)


def _with_legend(image: Image.Image, caption: str) -> Image.Image:
    import matplotlib

    width, height = image.size
    out = Image.new("RGB", (width, height + LEGEND_HEIGHT), "white")
    out.paste(image, (0, 0))
    bar_left, bar_right = 28, max(40, width // 2)
    ramp = np.linspace(0.0, 1.0, max(1, bar_right - bar_left))
    bar = (matplotlib.colormaps[COLOUR_MAP](ramp)[:, :3] * 255).astype(np.uint8)
    strip = np.repeat(bar[None], 10, axis=0)
    out.paste(Image.fromarray(strip), (bar_left, height + 6))
    draw = ImageDraw.Draw(out)
    draw.text((6, height + 4), "low", fill="black")
    draw.text((bar_right + 4, height + 4), "high", fill="black")
    draw.text((6, height + 20), caption, fill="black")
    return out


def overlay_png(
    pixels: np.ndarray,
    heat: np.ndarray,
    geometry: CropGeometry,
    *,
    caption: str = "",
    max_side: int = defaults.OVERLAY_MAX_SIDE,
) -> bytes:
    """``render_overlay`` as PNG bytes."""
    buffer = io.BytesIO()
    render_overlay(pixels, heat, geometry, caption=caption, max_side=max_side).save(buffer, "PNG")
    return buffer.getvalue()
