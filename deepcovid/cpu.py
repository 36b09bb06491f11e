"""Running the networks on CPU: how many side by side, how many threads each, and what the CPU offers.

Whole networks side by side, each on its own core, beat one network at a time over all cores: OpenMP's
per-layer barriers wait for whichever core the decode threads preempted (docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# One image through each network on one CPU core, in ms (AMD EPYC, AVX-512, fp32, batch 16, BatchNorm
# folded). Only the ratios matter: they balance the networks across CPU streams.
CPU_COST_MS = {"resnet18": 18.0, "resnet50": 51.0, "squeezenet1_1": 5.0, "densenet121": 45.0}


def cpu_streams(configured: int, networks: int, device: torch.device) -> int:
    """How many networks run at the same time on CPU: the configured count, else one per core (at most
    one per network). Always 1 on CUDA, where kernels are queued asynchronously anyway.

    Whole networks side by side, each on its own core, beat one network at a time over all cores:
    OpenMP's per-layer barriers wait for whichever core the decode threads preempted (docs/performance.md).
    """
    if device.type != "cpu" or networks < 2:
        return 1
    wanted = configured if configured > 0 else (os.cpu_count() or 1)
    return max(1, min(wanted, networks))


def cpu_inference_threads(configured: int, device: torch.device, streams: int = 1) -> int:
    """Torch threads per CPU stream: the configured count, else the cores shared out between streams."""
    if configured > 0:
        return configured
    if device.type != "cpu":
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, streams))


def partition_networks(architectures: Sequence[str], streams: int) -> list[tuple[str, ...]]:
    """Split the networks into ``streams`` groups of about equal CPU cost (longest first, to the
    cheapest group), each group keeping the ensemble's order."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(streams, len(architectures))))]
    loads = [0.0] * len(groups)
    default = max(CPU_COST_MS.values())
    for arch in sorted(architectures, key=lambda a: -CPU_COST_MS.get(a, default)):
        k = loads.index(min(loads))
        groups[k].append(arch)
        loads[k] += CPU_COST_MS.get(arch, default)
    order = {arch: i for i, arch in enumerate(architectures)}
    return [tuple(sorted(group, key=order.__getitem__)) for group in groups]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16,
    which is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
