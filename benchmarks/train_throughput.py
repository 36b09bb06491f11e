"""Training images/s per network: today's path against the new one (cache, fp32 and bf16), in one run.

A run of one epoch over ``--images`` synthetic 1024x1024 gray PNGs (X-ray-like, so they decode like the
large archive files), from the files to updated weights:

- old: what training did before: every run decodes every file (``decode_samples``, the inference path
  at 224), then fp32 steps with the paper's augmentation run per image by torchvision kernels.
- cached fp32: images from a warm training cache (``training.cache``, 256 crops, memory-mapped), the
  from-scratch recipe's CXR augmentation (random crop per image, the rest per batch), fp32 steps.
- cached bf16: the same in bf16 autocast (CPUs with AVX512-BF16 or AMX; ``-`` elsewhere): what
  ``deepcovid train`` runs there by default, while its per-epoch validation check allows.

All three use channels_last (the old path already did), ``train_one_epoch`` from training.train and one
warm-up step that is not timed (oneDNN builds its kernels on the first). The machine may be shared: only
ratios within one run mean anything. Last line: ``speed-up: N.Nx``, the smallest per-network ratio of the
new path (bf16 where the CPU has it, else cached fp32) to the old one.

    .venv/bin/python benchmarks/train_throughput.py [--images 48] [--batch-size 16] [--arch resnet18 ...]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from deepcovid import defaults  # noqa: E402
from deepcovid.cpu import cpu_has_native_bf16  # noqa: E402
from deepcovid.networks import ARCHITECTURES, build_network  # noqa: E402
from training.augment import Augmentation, CachedImages, make_augmentation  # noqa: E402
from training.data import DecodedSet, Sample, cached_samples, decode_samples  # noqa: E402
from training.synthetic import make_xray  # noqa: E402
from training.train import train_one_epoch  # noqa: E402

SIDE = 1024


def write_images(folder: Path, count: int) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(make_xray(SIDE, opacity=i % 2 == 0, seed=i)).save(buf, "PNG")
        path = folder / f"image_{i:04d}.png"
        path.write_bytes(buf.getvalue())
        samples.append(Sample(path=path, label=i % 2, name=path.name))
    return samples


def old_augmentation() -> Augmentation:
    """Today's: the paper's augmentation per image, torchvision kernels on each 224 crop."""
    per_image = v2.Compose(
        [
            v2.RandomRotation(degrees=10),
            v2.RandomResizedCrop(224, scale=(0.9, 1.0), ratio=(0.95, 1.05), antialias=True),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    )
    return Augmentation(crop=per_image, batch=None)


def epoch_seconds(
    arch: str, data: DecodedSet, augmentation: Augmentation, dtype: torch.dtype | None, batch: int
) -> float:
    """Seconds for one epoch of training steps over ``data`` (after one untimed warm-up step)."""
    torch.manual_seed(0)
    model = build_network(arch, "none").to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dataset = CachedImages(data, crop=augmentation.crop)
    cpu, criterion = torch.device("cpu"), nn.CrossEntropyLoss()
    warmup = DataLoader(torch.utils.data.Subset(dataset, range(batch)), batch_size=batch)
    train_one_epoch(model, criterion, optimizer, warmup, cpu, dtype=dtype, augment=augmentation.batch)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    started = time.perf_counter()
    train_one_epoch(model, criterion, optimizer, loader, cpu, dtype=dtype, augment=augmentation.batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES)
    args = parser.parse_args()
    archs = args.arch or list(ARCHITECTURES)
    images = args.images - args.images % args.batch_size
    bf16 = cpu_has_native_bf16()
    print(describe("cpu"))
    print(f"{images} synthetic {SIDE}x{SIDE} PNGs, batch {args.batch_size}, one epoch per path; bf16: {bf16}")
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_images(Path(tmp) / "images", images)
        cache = Path(tmp) / "cache"
        cached_samples(samples, side=defaults.TRAIN_CACHE_SIDE, root=cache)  # a previous run filled it
        print(f"{'network':<14} {'old img/s':>10} {'cached fp32':>12} {'cached bf16':>12} {'new/old':>8}")
        ratios, new = [], make_augmentation("cxr")
        for arch in archs:
            started = time.perf_counter()
            old_data = decode_samples(samples)
            old = images / (
                time.perf_counter()
                - started
                + epoch_seconds(arch, old_data, old_augmentation(), None, args.batch_size)
            )
            started = time.perf_counter()
            new_data = cached_samples(samples, side=defaults.TRAIN_CACHE_SIDE, root=cache)
            load = time.perf_counter() - started
            fp32 = images / (load + epoch_seconds(arch, new_data, new, None, args.batch_size))
            fast = (
                images / (load + epoch_seconds(arch, new_data, new, torch.bfloat16, args.batch_size))
                if bf16
                else None
            )
            ratios.append((fast or fp32) / old)
            fast_text = f"{fast:12.1f}" if fast else f"{'-':>12}"
            print(f"{arch:<14} {old:10.1f} {fp32:12.1f} {fast_text} {ratios[-1]:7.1f}x", flush=True)
    print(f"speed-up: {min(ratios):.1f}x")


if __name__ == "__main__":
    main()
