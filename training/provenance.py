"""How a bundle was made, as its manifest records it: data, split, settings, epochs, code and timing.

Enough to tell two bundles' training apart and to repeat a run; never patient identity.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from training.args import TrainArgs
from training.checkpoint import FitState
from training.data import DecodedSet, Split, class_counts, data_id
from training.metrics import strict_json


def provenance(
    args: TrainArgs,
    split: Split,
    decoded: tuple[DecodedSet, DecodedSet],
    states: Mapping[str, FitState],
    device: torch.device,
    *,
    started_at: datetime,
    clock: float,
) -> dict[str, Any]:
    """The manifest's ``provenance``: ``decoded`` is (train, validation); ``clock`` the run's start on
    ``time.perf_counter``."""
    train, val = decoded
    return strict_json(
        {
            "data_source": str(args.data.resolve()),
            "data_id": data_id(split.train + split.val),
            "test_source": str(args.test.resolve()) if args.test else None,
            "counts": {
                "train": class_counts(train.samples),
                "val": class_counts(val.samples),
                **({"test": class_counts(split.test)} if split.test else {}),
            },
            "patients": _patient_counts(split),
            "patient_split": split.by_patient,
            "skipped_images": len(train.skipped) + len(val.skipped),
            "seed": args.seed,
            "args": args.as_json(),
            "epochs_run": {arch: len(state.history) for arch, state in states.items()},
            "best_epoch": {arch: state.best_epoch for arch, state in states.items()},
            "stopped_early": {arch: state.stopped_early for arch, state in states.items()},
            "history": {arch: state.history for arch, state in states.items()},
            # bf16 or fp32 on CPU (fp16 AMP on CUDA) at the last epoch; history has every epoch's and
            # the bf16-vs-fp32 validation AUC gap that allowed bf16.
            "training_precision": {arch: _last_precision(state.history) for arch, state in states.items()},
            "device": str(device),
            "torch": torch.__version__,
            "git_commit": _git_commit(),
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - clock, 1),
        }
    )


def _last_precision(history: list[dict[str, Any]]) -> str | None:
    if not history:
        return None
    last = history[-1]
    return "fp32" if last.get("bf16_fallback") else last.get("precision", "fp32")


def _patient_counts(split: Split) -> dict[str, int] | None:
    if not split.by_patient:
        return None
    return {
        part: len({s.patient_id or s.name for s in getattr(split, part)})
        for part in ("train", "val", "test")
        if getattr(split, part)
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
