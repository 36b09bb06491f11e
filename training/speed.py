"""How a training run uses the machine: autocast precision, DataLoader workers, torch threads.

On CPU with bf16 instructions (AVX512-BF16 or AMX) bf16 autocast trains faster than fp32 (1.5-2x on
an AVX512-BF16 EPYC: benchmarks/train_throughput.py, docs/training.md); the weights stay fp32 and every
epoch's validation is scored in fp32.
The check that allows it: each epoch the validation AUC is also scored in bf16, and once the two differ
by more than ``BF16_AUC_TOLERANCE`` the rest of the run trains in fp32 (recorded per epoch in history).
"""

from __future__ import annotations

import os

import torch

from deepcovid.cpu import cpu_has_native_bf16

BF16_AUC_TOLERANCE = 0.01
"""Largest |validation AUC in bf16 - in fp32| at which CPU training keeps bf16 autocast."""


def training_dtype(device: torch.device, precision: str, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype to train in, None for fp32: fp16 AMP on CUDA (``amp``); on CPU bf16 when asked,
    or with ``auto`` where the CPU has bf16 instructions (elsewhere oneDNN emulates it, slower)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.float16 if amp else None
    if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def loader_workers(configured: int | None, device: torch.device) -> int:
    """DataLoader processes: the configured count, else on CUDA one per core up to 8 (augmenting must
    keep the GPU fed), on CPU none: the per-image work left (a random crop of the cached uint8 image)
    costs about a millisecond, a training step per image tens of times more, so a worker would only take
    a core from the compute threads (the rest of the augmentation runs per batch in the step)."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        return min(8, os.cpu_count() or 1)
    return 0


def set_training_threads(device: torch.device) -> None:
    """On CPU all cores compute (intra-op threads); torch's default may count hyper-threads or less."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def label(dtype: torch.dtype | None) -> str:
    """The precision's name as history and the manifest record it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
