"""uint8 images to a tensor batch, and the batch to the networks' normalised input on its device."""

from __future__ import annotations

import numpy as np
import torch

from deepcovid.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE


def collate(images: list[np.ndarray]) -> torch.Tensor:
    """Stack ``to_model_input`` outputs into a ``uint8`` ``[B,3,224,224]`` tensor (gray repeated)."""
    batch = np.empty((len(images), INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if image.shape == (INPUT_SIZE, INPUT_SIZE):
            batch[i] = image[:, :, None]
        elif image.shape == (INPUT_SIZE, INPUT_SIZE, 3):
            batch[i] = image
        else:
            raise ValueError(f"image {i} has shape {image.shape}, expected 224x224 or 224x224x3")
    # NHWC memory seen as NCHW: already channels_last, no copy.
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def normalize(batch_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` ``[B,3,H,W]`` to float32 ImageNet-normalised, channels_last, on the tensor's device."""
    device = batch_uint8.device
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    shift = -mean / std
    x = batch_uint8.to(dtype=torch.float32, memory_format=torch.channels_last)
    return x.mul_(scale).add_(shift)
