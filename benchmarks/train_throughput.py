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
warm-up step that is not timed (oneDNN builds its kernels on the first). The paths run interleaved
(old, fp32, bf16, old, ...; medians), and the data preparation (decode, or a warm cache read) is timed
the same way once and added to each epoch. Two ratios per network: by wall time, and by this process's
CPU time, which is steadier on a shared machine (and conservative: decoding runs on one core, so wall
time would credit the cache with more). Only ratios within one run mean anything. Last line:
``speed-up: N.Nx``, the smallest per-network ratio (the smaller of the two) of the new path (bf16 where
the CPU has it, else cached fp32) to the old one.

    .venv/bin/python benchmarks/train_throughput.py [--images 16] [--batch-size 8] [--repeats 2] [--arch ...]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, interleaved, median  # noqa: E402

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


class TrainingPath:
    """One training path for one network: its own model, optimizer and data; ``epoch`` runs one timed
    epoch (the first call also runs one untimed warm-up step: oneDNN builds its kernels there)."""

    def __init__(
        self, arch: str, data: DecodedSet, augmentation: Augmentation, dtype: torch.dtype | None, batch: int
    ) -> None:
        torch.manual_seed(0)
        self.model = build_network(arch, "none").to(memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.dataset = CachedImages(data, crop=augmentation.crop)
        self.augment, self.dtype, self.batch = augmentation.batch, dtype, batch
        self._run(DataLoader(torch.utils.data.Subset(self.dataset, range(batch)), batch_size=batch))

    def _run(self, loader: DataLoader) -> None:
        cpu, criterion = torch.device("cpu"), nn.CrossEntropyLoss()
        train_one_epoch(
            self.model, criterion, self.optimizer, loader, cpu, dtype=self.dtype, augment=self.augment
        )

    def epoch(self) -> float:
        started = time.perf_counter()
        self._run(DataLoader(self.dataset, batch_size=self.batch, shuffle=True, drop_last=True))
        return time.perf_counter() - started


def timed(run: Callable[[], object]) -> Callable[[], float]:
    def seconds() -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES)
    args = parser.parse_args()
    archs = args.arch or ["squeezenet1_1", "resnet18", "resnet50", "densenet121"]
    images = args.images - args.images % args.batch_size
    bf16 = cpu_has_native_bf16()
    print(describe("cpu"))
    print(
        f"{images} synthetic {SIDE}x{SIDE} PNGs, batch {args.batch_size}, "
        f"{args.repeats} interleaved rounds of one epoch per path; bf16: {bf16}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_images(Path(tmp) / "images", images)
        cache = Path(tmp) / "cache"
        cached_samples(samples, side=defaults.TRAIN_CACHE_SIDE, root=cache)  # a previous run filled it
        old_data = decode_samples(samples)
        new_data = cached_samples(samples, side=defaults.TRAIN_CACHE_SIDE, root=cache)
        cpu: dict[str, list[float]] = {}
        prep = interleaved(
            {
                "decode": timed(lambda: decode_samples(samples)),
                "cache": timed(lambda: cached_samples(samples, side=defaults.TRAIN_CACHE_SIDE, root=cache)),
            },
            args.repeats,
            cpu_seconds=cpu,
        )
        wall_prep = {"old": median(prep["decode"]), "new": median(prep["cache"])}
        cpu_prep = {"old": median(cpu["decode"]), "new": median(cpu["cache"])}
        print(
            f"data per run: decode {wall_prep['old']:.2f} s, warm cache {wall_prep['new']:.2f} s "
            f"(CPU {cpu_prep['old']:.2f} s / {cpu_prep['new']:.2f} s)"
        )
        print(
            f"{'network':<14} {'old img/s':>10} {'cached fp32':>12} {'cached bf16':>12} "
            f"{'new/old wall':>13} {'new/old CPU':>12}"
        )
        ratios, new = [], make_augmentation("cxr")
        for arch in archs:
            paths = {
                "old": TrainingPath(arch, old_data, old_augmentation(), None, args.batch_size),
                "fp32": TrainingPath(arch, new_data, new, None, args.batch_size),
            }
            if bf16:
                paths["bf16"] = TrainingPath(arch, new_data, new, torch.bfloat16, args.batch_size)
            cpu = {}
            wall = interleaved({name: p.epoch for name, p in paths.items()}, args.repeats, cpu_seconds=cpu)

            def rate(name: str, seconds: dict[str, list[float]], prep: dict[str, float]) -> float:
                return images / (prep["old" if name == "old" else "new"] + median(seconds[name]))

            fast = "bf16" if bf16 else "fp32"
            wall_ratio = rate(fast, wall, wall_prep) / rate("old", wall, wall_prep)
            cpu_ratio = rate(fast, cpu, cpu_prep) / rate("old", cpu, cpu_prep)
            ratios.append(min(wall_ratio, cpu_ratio))
            bf16_text = f"{rate('bf16', wall, wall_prep):12.2f}" if bf16 else f"{'-':>12}"
            print(
                f"{arch:<14} {rate('old', wall, wall_prep):10.2f} {rate('fp32', wall, wall_prep):12.2f} "
                f"{bf16_text} {wall_ratio:12.1f}x {cpu_ratio:11.1f}x",
                flush=True,
            )
    print(f"speed-up: {min(ratios):.1f}x")


if __name__ == "__main__":
    main()
