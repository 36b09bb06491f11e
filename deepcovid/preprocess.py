"""The paper's preprocessing: shorter side to 224 (antialiased bilinear), centre crop, ImageNet mean/std.

Images stay ``uint8`` (gray as one channel) until ``deepcovid.batches.collate``, so decode threads move
little memory and normalisation happens once, batched, on the inference device. No torch here: decode
threads, the pipeline and bundle checks use this module without loading it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deepcovid.decode import ImageInfo, decode
from deepcovid.eligibility import Eligibility

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow first reduces by an integer factor while the remaining downscale stays at least this large:
# much faster on big images and, at 3, visually identical to a plain resize.
REDUCING_GAP = 3.0


def resized_size(width: int, height: int, size: int = INPUT_SIZE) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side ``size``, longer truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_box(width: int, height: int, size: int = INPUT_SIZE) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in original pixels of the region Resize(224)+CenterCrop(224) keeps:
    what the model sees, and where an explanation map lies on the original image."""
    new_w, new_h = resized_size(width, height, size)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def to_model_input(
    pixels: np.ndarray, *, reducing_gap: float | None = None, size: int = INPUT_SIZE
) -> np.ndarray:
    """``uint8`` ``HxW`` or ``HxWx3`` to ``224x224`` (or ``224x224x3``), as Resize(224)+CenterCrop(224).

    Only the crop's source region is resampled (Pillow ``box``), which gives the same pixels as
    resizing the whole image and cropping after. Another ``size`` gives the same square crop at that
    side (the training cache keeps room for augmentation that way).
    """
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"expected uint8 HxW or HxWx3 pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    box = crop_box(width, height, size)
    image = Image.fromarray(pixels)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=reducing_gap)
    return np.asarray(out, dtype=np.uint8)


def load_image(
    data: bytes,
    *,
    name: str = "",
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
    eligibility: Eligibility | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Decode and preprocess in one go (the pipeline's path); raises only ``DecodeError``.

    JPEGs decode at the smallest DCT scale whose shorter side is still at least twice the input
    size, and large images are box-reduced before the final bilinear resize. The resize runs inside the
    decode, while the image's bytes still count against the decode budget.
    """
    decoded = decode(
        data,
        name=name,
        max_pixels=max_pixels,
        min_side=2 * INPUT_SIZE,
        max_decoded_bytes=max_decoded_bytes,
        transform=_model_input,
        eligibility=eligibility,
    )
    return decoded.pixels, decoded.info


def _model_input(pixels: np.ndarray) -> np.ndarray:
    return to_model_input(pixels, reducing_gap=REDUCING_GAP)
