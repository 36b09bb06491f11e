"""Which device scores, and the batch size that suits it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepcovid import defaults

if TYPE_CHECKING:
    import torch

    from deepcovid.settings import Settings


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda``/``cuda:N`` must exist; raises ValueError otherwise."""
    import torch  # torch: the pipeline imports this module for batch_size_for, and must stay light

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"invalid device {name!r}: {exc}") from exc
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


def batch_size_for(settings: Settings, device: Any) -> int:
    """The configured batch size, else the device's default (``defaults.CPU_BATCH_SIZE`` or
    ``defaults.CUDA_BATCH_SIZE``)."""
    if settings.batch_size > 0:
        return settings.batch_size
    return defaults.CUDA_BATCH_SIZE if getattr(device, "type", "cpu") == "cuda" else defaults.CPU_BATCH_SIZE
