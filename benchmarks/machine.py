"""The machine line every benchmark prints first, so a table is never read without its hardware and load."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# The real images beside the repository (../shared/data), or where DEEPCOVID_SHARED_DATA points.
SHARED_DATA = Path(
    os.environ.get("DEEPCOVID_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def describe(device: str = "cpu") -> str:
    """One block of text: CPU model and cores, torch version and threads, the device, and the load now."""
    import torch

    from deepcovid.cpu import cpu_has_native_bf16

    lines = [
        f"cpu     : {cpu_model()}, {os.cpu_count()} logical cores, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 hw: {'yes' if cpu_has_native_bf16() else 'no'}",
        f"torch   : {torch.__version__} (threads {torch.get_num_threads()}), "
        f"python {platform.python_version()}",
        f"device  : {device_name(device)}",
        f"load avg: {load_average()} (1/5/15 min, at start)",
    ]
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return f"{device}: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return device


def interleaved(
    variants: dict[str, Callable[[], float]],
    repeats: int,
    *,
    log: Callable[[str], None] | None = None,
    cpu_seconds: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Run each variant once per round (A, B, A, B, ...) so load changes hit every variant alike.

    Each callable returns a rate (or a time); all measurements are returned per variant. When
    ``cpu_seconds`` is given it receives each call's process CPU time (all threads of this process):
    on a shared machine that is steadier than wall time.
    """
    out: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            cpu_started = time.process_time()
            value = run()
            if cpu_seconds is not None:
                cpu_seconds.setdefault(name, []).append(time.process_time() - cpu_started)
            out[name].append(value)
            if log is not None:
                log(
                    f"  round {round_index + 1}/{repeats} {name}: {value:.3f} "
                    f"({time.perf_counter() - started:.1f} s, load {load_average().split()[0]})"
                )
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
