"""The recipes: the paper's with ImageNet weights, the from-scratch one without; schedule and augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.args import RECIPES, TrainArgs
from training.augment import BatchAugment, make_augmentation
from training.optim import lr_at
from training.speed import training_dtype


def _args(**kw) -> TrainArgs:
    return TrainArgs(data=Path("data"), out=Path("out"), **kw)


def test_imagenet_weights_keep_the_papers_recipe() -> None:
    args = _args()
    assert (args.recipe, args.finetune, args.optimizer, args.lr, args.batch_size) == (
        "paper", "head", "adam", 1e-4, 100,
    )  # fmt: skip
    assert args.label_smoothing == 0 and args.schedule == "constant" and args.early_stopping is None


def test_from_scratch_takes_the_scratch_recipe_and_options_override_it() -> None:
    args = _args(pretrained="none")
    scratch = RECIPES["scratch"]
    assert args.recipe == "scratch" and args.finetune == "all"
    assert (args.optimizer, args.lr, args.weight_decay, args.augment) == (
        scratch.optimizer, scratch.lr, scratch.weight_decay, "cxr",
    )  # fmt: skip
    assert args.early_stopping == scratch.early_stopping and args.ema is None
    tuned = _args(pretrained="none", lr=3e-4, early_stopping=0, ema=0.999)
    assert tuned.lr == 3e-4 and tuned.early_stopping is None and tuned.ema == 0.999
    with pytest.raises(ValueError, match="recipe"):
        _args(recipe="fast")
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        _args(test_where="source")
    with pytest.raises(ValueError, match="without --test"):
        _args(test_where="view=AP", test_fraction=0.2)


def test_learning_rate_warms_up_then_decays_by_cosine() -> None:
    args = _args(pretrained="none", epochs=10, warmup_epochs=2, lr=1e-3)
    steps = 5
    lrs = [lr_at(args, step, steps) for step in range(10 * steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] < 1e-5 and math.isclose(
        lr_at(args, 10 + 20, steps), 1e-3 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert lr_at(_args(), 123, 7) == 1e-4  # the paper: constant


def test_cxr_augmentation_keeps_the_image_upright_and_in_range() -> None:
    torch.manual_seed(0)
    # Bright top half, dark bottom half: a vertical flip would swap them; rotations of 7 degrees do not.
    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    image[:, :128] = 200
    augmentation = make_augmentation("cxr")
    crops = torch.stack([augmentation.crop(image) for _ in range(16)])
    assert crops.shape == (16, 3, 224, 224) and crops.dtype == torch.uint8
    out = augmentation.batch(crops)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    top, bottom = out[:, :, 40:80, 80:140].mean(dim=(1, 2, 3)), out[:, :, 150:190, 80:140].mean(dim=(1, 2, 3))
    assert bool((top > bottom).all())
    # Noise is the same in every channel: a grey film stays grey.
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_batch_augment_without_changes_is_the_identity() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    same = BatchAugment(degrees=0, brightness=(1, 1), contrast=(1, 1))(images)
    torch.testing.assert_close(same, images.float(), atol=0.01, rtol=0)


def test_training_precision_follows_the_device_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import speed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    assert training_dtype(cpu, "auto") is torch.bfloat16 and training_dtype(cpu, "fp32") is None
    assert training_dtype(cuda, "auto") is torch.float16 and training_dtype(cuda, "auto", amp=False) is None
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    assert training_dtype(cpu, "auto") is None and training_dtype(cpu, "bf16") is torch.bfloat16
