"""Augmentations on uint8 image tensors (torchvision.transforms.v2), from the cached crop to the 224 input.

Two sets: the paper's mild one (ImageNet fine-tuning) and a stronger one for training from scratch that
suits chest X-rays: crops that keep the lungs, small rotations, brightness, contrast, gamma and film noise,
and never a vertical flip (no scanner produces an upside-down chest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from deepcovid.preprocess import INPUT_SIZE
from training.data import DecodedSet

AUGMENTATIONS = ("paper", "cxr")


@dataclass(frozen=True)
class BatchAugment:
    """The per-image random rotation, brightness, contrast, gamma and film noise, drawn per image but
    applied to a whole batch at once on the training device: one affine resampling and a few
    element-wise ops (per-image torchvision kernels cost more than a small network's step on CPU).
    Takes uint8 or float [B, 3, H, W] in 0..255, returns float in 0..255 for ``normalize``."""

    degrees: float
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    gamma: tuple[float, float] = (1.0, 1.0)
    noise: float = 0.0  # the largest standard deviation, in grey levels; the same in every channel

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, device = images.shape[0], images.device

        def draw(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, 1, 1, 1).uniform_(low, high).to(device)

        # A grey film (three equal channels, as chest X-rays are) is augmented once and repeated.
        gray = images.shape[1] == 3 and bool((images[:, 1:] == images[:, :1]).all())
        x = (images[:, :1] if gray else images).float().div_(255.0)
        if self.degrees:
            x = _rotate(x, draw(-self.degrees, self.degrees).view(n) * (math.pi / 180.0))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean).mul_(draw(*self.contrast)).add_(mean).mul_(draw(*self.brightness)).clamp_(1e-6, 1.0)
        x = x.pow_(draw(*self.gamma)).mul_(255.0)
        if self.noise:
            x = x.add_(torch.randn(n, 1, *x.shape[-2:]).to(device).mul_(draw(0.0, self.noise)))
        x = x.clamp_(0.0, 255.0)
        return x.expand(-1, 3, -1, -1) if gray else x


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (radians); corners outside the film are black,
    as torchvision's RandomRotation leaves them."""
    cos, sin = angles.cos(), angles.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


@dataclass(frozen=True)
class Augmentation:
    """What the DataLoader does per image (``crop``: random crop to 224, optional flip, on uint8) and what
    the training step does per batch on its device (``batch``)."""

    crop: v2.Transform
    batch: BatchAugment


def make_augmentation(kind: str = "paper", hflip: bool = False) -> Augmentation:
    """The training augmentation ``kind``, ending in a 224 input.

    Horizontal flips are off by default: chest X-rays have a side (heart on the left), and a flipped
    film is an image no scanner produces. The paper did flip; ``hflip=True`` restores that.
    """
    if kind == "paper":  # mild, anatomy-preserving (the paper augmented to enlarge the COVID class)
        crop = v2.RandomResizedCrop(INPUT_SIZE, scale=(0.9, 1.0), ratio=(0.95, 1.05), antialias=True)
        batch = BatchAugment(degrees=10, brightness=(0.9, 1.1), contrast=(0.9, 1.1))
    elif kind == "cxr":
        # At least 65% of the centre square's area, near-square: both lungs stay in view.
        crop = v2.RandomResizedCrop(INPUT_SIZE, scale=(0.65, 1.0), ratio=(0.85, 1.18), antialias=True)
        batch = BatchAugment(
            degrees=7, brightness=(0.8, 1.2), contrast=(0.8, 1.2), gamma=(0.7, 1.4), noise=6.0
        )
    else:
        raise ValueError(f"unknown augmentation {kind!r}; choose from {', '.join(AUGMENTATIONS)}")
    return Augmentation(crop=v2.Compose([crop, v2.RandomHorizontalFlip()]) if hflip else crop, batch=batch)


class CachedImages:
    """A torch Dataset over a DecodedSet: (uint8 [3,224,224], label), each image through ``crop`` when
    given, else resized to the input (the same field of view) if cached larger."""

    def __init__(self, decoded: DecodedSet, crop: v2.Transform | None = None) -> None:
        self.images = decoded.images
        self.labels = decoded.labels
        self.crop = crop

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (self.crop(image) if self.crop is not None else to_input_size(image)), int(self.labels[index])


def to_input_size(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] as the 224 input: unchanged at 224, else resized (antialiased)."""
    if images.shape[-1] == INPUT_SIZE and images.shape[-2] == INPUT_SIZE:
        return images
    return v2.functional.resize(images, [INPUT_SIZE, INPUT_SIZE], antialias=True)
