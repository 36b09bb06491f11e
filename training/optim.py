"""What updates the weights: the optimizer of a recipe, its learning-rate schedule, an optional EMA.

The learning rate is a pure function of the step (``lr_at``), set before every step rather than held in a
scheduler object, so a resumed run continues the schedule exactly without storing scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training.args import TrainArgs


def make_optimizer(parameters: Iterable[nn.Parameter], args: TrainArgs) -> torch.optim.Optimizer:
    """Adam (the paper) or AdamW with the recipe's decoupled weight decay."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)


def lr_at(args: TrainArgs, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs`` (half the run at most), then constant or cosine decay to zero
    at the last epoch."""
    warmup = min(args.warmup_epochs, args.epochs // 2) * steps_per_epoch  # short runs: half at most
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    total = max(1, args.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm buffers, or None when off."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
