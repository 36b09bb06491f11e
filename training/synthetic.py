"""Synthetic chest-X-ray-like images for demos and tests: no patient data, classes visibly separable.

"COVID" images carry patchy opacities in the lower and peripheral lung fields, the pattern the real
disease most often shows; "non-COVID" images have clear lungs. It is a stand-in that exercises the
whole pipeline offline, not a model of the disease.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

Size = int | tuple[int, int]  # an int is a square; a tuple is (width, height)


def _wh(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def make_xray(size: Size = 64, opacity: bool = False, seed: int = 0) -> np.ndarray:
    """A ``uint8`` ``HxW`` chest-radiograph-like image; ``opacity=True`` adds blotchy lung opacities.

    Dark lung fields inside a brighter body, a spine and ribs; the COVID-like class gets bright,
    patchy ground-glass blobs spread over the lower and peripheral lung fields, so the two classes
    are clearly separable even with an untrained backbone.
    """
    w, h = _wh(size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / w, yy / h  # 0..1 coordinates

    img = np.full((h, w), 0.08)
    body = ((u - 0.5) / 0.46) ** 2 + ((v - 0.55) / 0.55) ** 2 < 1.0
    img[body] = 0.55 + rng.uniform(-0.05, 0.05)
    lung_masks = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        cy = rng.uniform(0.47, 0.53)
        rx, ry = rng.uniform(0.13, 0.16), rng.uniform(0.28, 0.33)
        mask = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 < 1.0
        lung_masks.append(mask)
        img[mask] = 0.22 + rng.uniform(-0.03, 0.03)
    lungs = lung_masks[0] | lung_masks[1]
    spine = np.abs(u - 0.5) < 0.045
    img[spine & body] = 0.78
    phase = rng.uniform(0, 2 * np.pi)
    ribs = np.sin(2 * np.pi * (v * 7.0 + 0.6 * (u - 0.5) ** 2 * 4) + phase) > 0.75
    img[ribs & lungs] += 0.12

    if opacity:
        blobs = np.zeros((h, w))
        for _ in range(int(rng.integers(6, 10))):
            side = rng.choice((-1, 1))
            cx = 0.5 + side * rng.uniform(0.12, 0.3)
            cy = rng.uniform(0.45, 0.78)
            r = rng.uniform(0.05, 0.1)
            blobs += np.exp(-(((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r)))
        texture = rng.uniform(0.6, 1.0, (h, w))
        img += lungs * np.clip(blobs, 0, 1.2) * 0.45 * texture

    img += rng.normal(0, 0.025, (h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def xray_png_bytes(size: Size = 64, opacity: bool = False, seed: int = 0) -> bytes:
    """``make_xray`` encoded as an 8-bit gray PNG."""
    buf = io.BytesIO()
    Image.fromarray(make_xray(size, opacity, seed)).save(buf, "PNG")
    return buf.getvalue()


def write_labelled_folder(
    root: Path, n_covid: int, n_non_covid: int, size: Size = 64, seed: int = 0
) -> dict[str, list[Path]]:
    """Write ``root/covid/*.png`` (with opacities) and ``root/non_covid/*.png``; returns the paths."""
    root = Path(root)
    written: dict[str, list[Path]] = {"covid": [], "non_covid": []}
    for label, count, opacity, offset in (
        ("covid", n_covid, True, 0),
        ("non_covid", n_non_covid, False, 100_000),
    ):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"{label}_{i:04d}.png"
            path.write_bytes(xray_png_bytes(size, opacity, seed * 1_000_003 + offset + i))
            written[label].append(path)
    return written


def write_demo_archive(root: Path, n_images: int, *, size: int = 256, seed: int = 1) -> Path:
    """An unlabelled archive as a hospital would have it: dated folders, about 30% with opacities,
    plus two broken files so the summary shows what a failure looks like."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        folder = root / f"2020-{(i % 12) + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        opacity = bool(rng.random() < 0.3)
        (folder / f"study_{i:05d}.png").write_bytes(xray_png_bytes(size, opacity, seed * 7919 + i))
    incoming = root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / "empty.png").write_bytes(b"")
    (incoming / "notes.png").write_text("not an image: a text file with an image name\n")
    return root
