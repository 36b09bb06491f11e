"""What a training run depends on: one dataclass, whose field defaults are the only ones (the CLI reads them).

Kept free of torch so that ``deepcovid train --help`` can show these defaults without loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepcovid import defaults
from deepcovid.networks import ARCHITECTURES


@dataclass
class TrainArgs:
    """Everything a training run depends on. Defaults follow Minaee et al. (2020)."""

    data: Path
    out: Path
    test: Path | None = None
    archs: Sequence[str] | None = ARCHITECTURES  # None or empty: all four
    pretrained: str = "imagenet"  # imagenet | none | path to a checkpoint file or directory
    finetune: str = "head"  # head (only the last layer, as in the paper) | all
    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.TRAIN_BATCH_SIZE
    lr: float = defaults.LEARNING_RATE
    seed: int = 0
    device: str = "auto"
    val_fraction: float = defaults.VAL_FRACTION
    test_fraction: float = 0.0
    target_sensitivity: float = defaults.TARGET_SENSITIVITY
    early_stopping: int | None = None  # patience in epochs without a better validation AUC
    resume: bool = False
    checkpoint_dir: Path | None = None
    report_dir: Path | None = None
    workers: int = 0
    hflip: bool = False
    amp: bool = True  # mixed precision on CUDA only
    recalibrate_bn: bool = True  # with --finetune all: BatchNorm statistics recomputed after each epoch
    deterministic: bool = True
    progress: bool = True
    bf16_check_images: int = defaults.BF16_CHECK_IMAGES
    int8_calibration_images: int = defaults.INT8_CALIBRATION_IMAGES  # 0: no int8 networks in the bundle

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        self.archs = tuple(self.archs or ()) or ARCHITECTURES
        unknown = [a for a in self.archs if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHITECTURES)}")
        if self.finetune not in ("head", "all"):
            raise ValueError(f"--finetune must be head or all, got {self.finetune!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch size and learning rate must be positive")

    @property
    def effective_checkpoint_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.out.parent / f"{self.out.name}.ckpt"

    @property
    def effective_report_dir(self) -> Path:
        return Path(self.report_dir) if self.report_dir else self.out.parent / f"{self.out.name}.report"

    def as_json(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
        }
