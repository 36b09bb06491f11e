"""What a training run depends on: one dataclass, whose field defaults are the only ones (the CLI reads them).

Kept free of torch so that ``deepcovid train --help`` can show these defaults without loading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from deepcovid import defaults
from deepcovid.networks import ARCHITECTURES


@dataclass(frozen=True)
class Recipe:
    """How the networks learn. Fields of ``TrainArgs`` left at None take the recipe's value."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # adam | adamw
    weight_decay: float
    label_smoothing: float
    warmup_epochs: int
    schedule: str  # constant | cosine (after the warm-up)
    augment: str  # paper | cxr (training.augment)
    early_stopping: int | None  # patience in epochs without a better validation AUC
    ema: float | None  # decay of an exponential moving average of the weights; None: off


RECIPES = {
    # Minaee et al. (2020): ImageNet weights, only the last layer trains, Adam at 1e-4, batches of 100.
    "paper": Recipe(
        epochs=defaults.EPOCHS,
        batch_size=defaults.TRAIN_BATCH_SIZE,
        lr=defaults.LEARNING_RATE,
        optimizer="adam",
        weight_decay=0.0,
        label_smoothing=0.0,
        warmup_epochs=0,
        schedule="constant",
        augment="paper",
        early_stopping=None,
        ema=None,
    ),
    # From random weights on a few hundred images (docs/training.md): every layer trains, so a larger
    # learning rate with warm-up, decoupled weight decay and label smoothing against over-confidence,
    # CXR augmentations, and stopping once validation AUC stops improving.
    "scratch": Recipe(
        epochs=40,
        batch_size=32,
        lr=1e-3,
        optimizer="adamw",
        weight_decay=0.05,
        label_smoothing=0.1,
        warmup_epochs=2,
        schedule="cosine",
        augment="cxr",
        early_stopping=10,
        ema=None,
    ),
}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def default_recipe(pretrained: str) -> str:
    """The paper's recipe with ImageNet weights (or a checkpoint), the from-scratch one without."""
    return "scratch" if pretrained == "none" else "paper"


@dataclass
class TrainArgs:
    """Everything a training run depends on. Recipe fields left at None come from ``RECIPES``."""

    data: Path
    out: Path
    test: Path | None = None
    archs: Sequence[str] | None = ARCHITECTURES  # None or empty: all four
    pretrained: str = "imagenet"  # imagenet | none | path to a checkpoint file or directory
    finetune: str | None = None  # head (only the last layer, the paper) | all; None: all from scratch
    recipe: str | None = None  # paper | scratch; None: scratch with --pretrained none, else paper
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    warmup_epochs: int | None = None
    schedule: str | None = None
    augment: str | None = None
    ema: float | None = None
    seed: int = 0
    device: str = "auto"
    val_fraction: float = defaults.VAL_FRACTION
    test_fraction: float = 0.0
    target_sensitivity: float = defaults.TARGET_SENSITIVITY
    early_stopping: int | None = None  # patience in epochs without a better validation AUC; 0: never
    resume: bool = False
    checkpoint_dir: Path | None = None
    report_dir: Path | None = None
    workers: int | None = None  # DataLoader processes; None: chosen for the device (training.speed)
    precision: str = "auto"  # auto | fp32 | bf16 (CPU) ; auto: bf16 where the CPU has it and it holds
    cache: bool = True  # decode through the training cache
    cache_dir: Path | None = None  # default: <data_dir>/cache/train
    test_where: str | None = None  # COLUMN=VALUE: that group of a CSV's rows is the test set
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
        self.recipe = self.recipe or default_recipe(str(self.pretrained))
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        if self.early_stopping == 0:
            self.early_stopping = None
        if self.ema == 0:
            self.ema = None
        self.finetune = self.finetune or ("all" if str(self.pretrained) == "none" else "head")
        if self.optimizer not in ("adam", "adamw") or self.schedule not in ("constant", "cosine"):
            raise ValueError("--optimizer must be adam or adamw, --schedule constant or cosine")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"--ema must be a decay between 0 and 1, got {self.ema}")
        if self.test_where is not None and "=" not in self.test_where:
            raise ValueError(f"--test-where needs COLUMN=VALUE, got {self.test_where!r}")
        if self.test_where is not None and (self.test is not None or self.test_fraction > 0):
            raise ValueError("--test-where is the test set: give it without --test or --test-fraction")
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
