"""Make the two overlay examples in docs/examples/ from synthetic images (never real patient data).

A small CNN is trained for a few seconds on synthetic chest-X-ray-like images, twice: once where the
class is a bright opacity inside a lung field, once where it is a burned-in marker in the top-left
corner: the shortcut heatmaps exist to catch. Each is then prepared as workers prepare networks
(``prepare_network``), explained with ``deepcovid.explain.gradcam_at`` and drawn with
``deepcovid.overlay.overlay_png`` on the full-size image, exactly as ``deepcovid explain`` draws (then
palette-quantised, to keep the repository small).

    PYTHONPATH=. .venv/bin/python docs/examples/make_heatmap_examples.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepcovid.batches import normalize
from deepcovid.explain import CropGeometry, gradcam_at
from deepcovid.networks import prepare_network
from deepcovid.overlay import overlay_png

OUT = Path(__file__).resolve().parent
TRAIN_SIZE = 112
SHOWN_SIZE = 320
COLOURS = 256  # the PNG is palette-quantised (octree: the legend keeps its colours), well under 100 KB


def chest(size: int, rng: np.random.Generator) -> np.ndarray:
    """A body-like intensity with two darker lung fields, ribs and noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = 170 - 90 * ((xx - 0.5) ** 2 * 3 + (yy - 0.55) ** 2 * 1.5)
    lungs = sum(np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2)) for cx in (0.32, 0.68))
    ribs = 12 * np.sin(yy * 60 + 3 * np.abs(xx - 0.5)) * lungs
    return body - 80 * lungs + ribs + rng.normal(0, 3, (size, size))


def marked(size: int, positive: bool, kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 image; a positive one carries an opacity in a lung ("lesion") or a corner marker ("shortcut")."""
    image = chest(size, rng)
    if positive:
        yy, xx = np.mgrid[0:size, 0:size] / size
        if kind == "lesion":
            cx, cy = rng.choice([0.32, 0.68]) + rng.uniform(-0.05, 0.05), rng.uniform(0.4, 0.65)
            image += 110 * np.exp(-(((xx - cx) / 0.05) ** 2 + ((yy - cy) / 0.05) ** 2))
        else:
            image[(xx > 0.04) & (xx < 0.16) & (yy > 0.04) & (yy < 0.12)] = 250
    return np.clip(image, 0, 255).astype(np.uint8)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((3, 8, 2), (8, 16, 2), (16, 16, 1), (16, 16, 1)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def batch(images: list[np.ndarray]) -> torch.Tensor:
    return normalize(torch.from_numpy(np.repeat(np.stack(images)[:, None], 3, axis=1)))


def train(kind: str, rng: np.random.Generator) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        labels = np.arange(32) % 2
        images = [marked(TRAIN_SIZE, bool(label), kind, rng) for label in labels]
        loss = nn.functional.cross_entropy(model(batch(images)), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return prepare_network(model.eval(), torch.device("cpu"))


def example(kind: str, caption: str, rng: np.random.Generator) -> Path:
    model = train(kind, rng)
    shown = marked(SHOWN_SIZE, True, kind, rng)
    small = np.asarray(Image.fromarray(shown).resize((TRAIN_SIZE, TRAIN_SIZE), Image.Resampling.BILINEAR))
    maps, probabilities = gradcam_at(model, model.get_submodule("pool"), batch([small]), at_input=True)
    geometry = CropGeometry.for_size(SHOWN_SIZE, SHOWN_SIZE)
    text = f"{caption}; synthetic image, P(COVID) {probabilities[0]:.2f}"
    png = overlay_png(shown, maps[0], geometry, caption=text, max_side=SHOWN_SIZE)
    path = OUT / f"heatmap-{kind}.png"
    Image.open(io.BytesIO(png)).quantize(COLOURS, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


def main() -> None:
    rng = np.random.default_rng(7)
    for kind, caption in (("lesion", "looks at the opacity"), ("shortcut", "shortcut: looks at the marker")):
        path = example(kind, caption, rng)
        print(f"{path.relative_to(OUT.parent.parent)}: {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
