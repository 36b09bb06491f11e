"""Synthetic chest-X-ray-like images for demos and tests: no patient data, classes visibly separable.

"COVID" images carry bilateral patchy opacities in the lower lung fields, the pattern the real
disease most often shows; "non-COVID" images have clear lungs. It is a stand-in that exercises the
whole pipeline offline, not a model of the disease.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def make_xray(size: int = 128, opacity: bool = False, seed: int = 0) -> np.ndarray:
    """A ``size x size`` uint8 frontal 'radiograph': body, spine, ribs, two dark lungs (+ opacities)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.25, np.float32)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
    img[body] = 0.62 + rng.uniform(-0.05, 0.05)
    lungs = np.zeros_like(img, dtype=bool)
    for cx in (0.31 + rng.uniform(-0.02, 0.02), 0.69 + rng.uniform(-0.02, 0.02)):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.48) / 0.3) ** 2 < 1
        lungs |= lung
    img[lungs] = 0.18 + rng.uniform(-0.04, 0.04)
    for k in range(7):  # ribs: faint bright arcs across the lung fields
        y0 = 0.24 + 0.075 * k
        rib = np.abs(yy - (y0 + 0.06 * ((xx - 0.5) * 2) ** 2)) < 0.008
        img[rib & lungs] += 0.12
    spine = np.abs(xx - 0.5) < 0.045
    img[spine & body] = 0.8
    if opacity:
        for _ in range(int(rng.integers(5, 10))):
            cx = rng.choice([0.31, 0.69]) + rng.uniform(-0.08, 0.08)
            cy = rng.uniform(0.45, 0.72)
            r = rng.uniform(0.04, 0.09)
            blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
            img += 0.38 * blob * lungs
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_labelled_folder(
    root: Path, n_covid: int, n_non_covid: int, *, size: int = 128, seed: int = 0, patients: bool = False
) -> Path:
    """Write ``root/covid/*.png`` and ``root/non_covid/*.png``; with ``patients`` also a labels.csv
    where pairs of images share a patient id (to exercise patient-level splits)."""
    root = Path(root)
    rows = []
    for label, count, opacity in (("covid", n_covid, True), ("non_covid", n_non_covid, False)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{label}/{label}_{i:04d}.png"
            Image.fromarray(make_xray(size, opacity, seed=seed * 100_003 + i * 2 + int(opacity))).save(
                root / name
            )
            rows.append((name, label, f"{label}-p{i // 2:04d}"))
    if patients:
        with open(root / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "patient_id"])
            writer.writerows(rows)
    return root


def write_demo_archive(root: Path, n_images: int, *, size: int = 256, seed: int = 1) -> Path:
    """An unlabelled archive as a hospital would have it: nested folders, a few broken files."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        folder = root / f"2020-{(i % 12) + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        opacity = bool(rng.random() < 0.3)
        Image.fromarray(make_xray(size, opacity, seed=seed * 7919 + i)).save(folder / f"study_{i:05d}.png")
    broken = root / "incoming"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "empty.png").write_bytes(b"")
    (broken / "notes.png").write_text("not an image, a text file with an image name\n")
    return root
