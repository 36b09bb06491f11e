"""Fine-tune the Deep-COVID networks and write a bundle with thresholds chosen on validation data.

Laid out like torchvision's references/classification/train.py: ``train_one_epoch``, ``evaluate`` and
``main(args)``. With ImageNet weights the defaults are the paper's (``RECIPES["paper"]``): only the last
layer trained, cross-entropy, Adam at 1e-4, batches of 100, 100 epochs. With ``--pretrained none`` every
layer trains with the from-scratch recipe (AdamW, warm-up + cosine, label smoothing, CXR augmentations,
early stopping). Images come from the training cache; on CPUs with bf16 instructions steps run in bf16
autocast while a per-epoch check allows it (``training.speed``). Every epoch is seeded from (seed, epoch),
so a resumed run replays exactly what a straight run does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from deepcovid.batches import normalize
from deepcovid.bundle import Bundle, save_bundle
from deepcovid.devices import resolve_device
from deepcovid.int8 import engine_missing
from deepcovid.networks import COVID_INDEX, build_network, freeze_backbone, head_parameters, set_train_mode
from deepcovid.precision import BF16_CHECK_KEY
from deepcovid.settings import get_settings
from training.args import RECIPE_FIELDS, TrainArgs
from training.augment import CachedImages, make_augmentation, to_input_size
from training.checkpoint import CheckpointFiles, FitState, clone_weights, resume, save_best, save_last
from training.data import DecodedSet, Sample, balanced_sampler, data_id, prepare_data, write_samples_csv
from training.evaluate import evaluate_bundle
from training.metrics import roc_auc
from training.optim import lr_at, make_ema, make_optimizer, set_lr
from training.progress import EpochBar, progress_display
from training.provenance import provenance
from training.quantize import calibration_subset, quantize_models
from training.speed import BF16_AUC_TOLERANCE, label, loader_workers, set_training_threads, training_dtype
from training.validation import POLICY, ValidationRecord, bf16_check, validation_record

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """One pass over labelled data: COVID probabilities, labels, mean loss and ROC AUC, and the logits
    [N, classes] that temperature scaling is fitted on."""

    probabilities: np.ndarray
    labels: np.ndarray
    loss: float
    auc: float
    logits: np.ndarray


@dataclass
class Learner:
    """One network and what trains it."""

    arch: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    frozen: bool  # only the head trains
    dtype: torch.dtype | None  # autocast dtype of the training steps; None: fp32
    ema: AveragedModel | None = None

    @property
    def scored(self) -> nn.Module:
        """What validation scores and the bundle keeps: the EMA of the weights when on."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class FitResult:
    """A trained network holding its best-validation weights, and how its training went."""

    model: nn.Module
    state: FitState


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return normalize(images.to(device, non_blocking=True))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    schedule: Callable[[int], float] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ema: AveragedModel | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> float:
    """One pass over ``loader`` in autocast ``dtype``; returns the mean training loss. ``schedule`` gives
    the learning rate of each step of the epoch, ``augment`` transforms each batch on the device (0..255
    in and out). The caller sets train mode."""
    total, count = 0.0, 0
    use_scaler = scaler is not None and scaler.is_enabled()
    for step, (images, labels) in enumerate(loader):
        if schedule is not None:
            set_lr(optimizer, schedule(step))
        images = images.to(device, non_blocking=True)
        inputs = normalize(augment(images) if augment is not None else images)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, dtype):
            loss = criterion(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        total += float(loss.detach()) * labels.shape[0]
        count += labels.shape[0]
        if on_batch is not None:
            on_batch(float(loss.detach()))
    return total / max(count, 1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    decoded: DecodedSet,
    device: torch.device,
    *,
    criterion: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
) -> Evaluation:
    """COVID probabilities (softmax, class ``COVID_INDEX``) over ``decoded`` with loss and AUC, scored in
    batches straight from the cached tensor (no DataLoader: nothing to augment)."""
    model.eval()
    chunks = []
    for start in range(0, len(decoded.labels), batch_size):
        inputs = _to_model_input(to_input_size(decoded.images[start : start + batch_size]), device)
        with _autocast(device, dtype):
            chunks.append(model(inputs).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.empty((0, 2))
    loss = float((criterion or nn.CrossEntropyLoss())(logits, decoded.labels)) if chunks else 0.0
    p = logits.softmax(dim=1)[:, COVID_INDEX].numpy()
    y = decoded.labels.numpy()
    return Evaluation(probabilities=p, labels=y, loss=loss, auc=roc_auc(y, p), logits=logits.numpy())


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, decoded: DecodedSet, device: torch.device, batch_size: int
) -> None:
    """Recompute BatchNorm running statistics on the (unaugmented) training images.

    When every layer trains, the running averages lag behind weights that moved in the last few
    hundred steps; evaluation then sees stale statistics and validation AUC can even invert early on
    (seen on small data). One forward pass with cumulative averaging makes them match the weights.
    """
    batches = (
        _to_model_input(to_input_size(decoded.images[i : i + batch_size]), device)
        for i in range(0, int(decoded.labels.shape[0]), batch_size)
    )
    update_bn(batches, model)


def _fingerprint(arch: str, args: TrainArgs, train: DecodedSet, val: DecodedSet) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (the epoch count may grow)."""
    return {
        "arch": arch,
        "pretrained": str(args.pretrained),
        "finetune": args.finetune,
        # The epoch count may grow on resume (a cosine schedule then stretches from there on).
        **{name: getattr(args, name) for name in RECIPE_FIELDS if name != "epochs"},
        "seed": args.seed,
        "hflip": args.hflip,
        "recalibrate_bn": args.recalibrate_bn,
        "train_data_id": data_id(train.samples),
        "val_data_id": data_id(val.samples),
    }


def _train_loader(
    train: DecodedSet, crop: v2.Transform, args: TrainArgs, epoch: int, device: torch.device
) -> DataLoader:
    # Both classes are augmented: augmenting COVID alone lets a network learn "rotated = COVID"
    # (black corners, softer crops) instead of the disease; over-sampling still balances the classes.
    dataset = CachedImages(train, crop=crop)
    sampler = balanced_sampler(train.labels, seed=_epoch_seed(args.seed, epoch))
    generator = torch.Generator().manual_seed(_epoch_seed(args.seed, epoch))
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=loader_workers(args.workers, device),
        pin_memory=device.type == "cuda",
        generator=generator,
        # BatchNorm cannot train on a batch of one.
        drop_last=len(sampler) % args.batch_size == 1,
    )


def build_learner(arch: str, args: TrainArgs, device: torch.device) -> Learner:
    """The network from its starting weights, with the recipe's optimizer over the layers that train."""
    model = build_network(arch, args.pretrained, settings=get_settings())
    frozen = args.finetune == "head"
    if frozen:
        freeze_backbone(model, arch)
        parameters = head_parameters(model, arch)
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
    model.to(device, memory_format=torch.channels_last)
    dtype = training_dtype(device, args.precision, args.amp)
    return Learner(
        arch=arch,
        model=model,
        optimizer=make_optimizer(parameters, args),
        scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
        frozen=frozen,
        dtype=dtype,
        ema=make_ema(model, args.ema),
    )


def _start(
    learner: Learner, args: TrainArgs, files: CheckpointFiles, fingerprint: dict[str, Any]
) -> tuple[FitState, dict[str, torch.Tensor] | None]:
    """A fresh state, or with ``--resume`` the one in the last checkpoint and the best weights so far."""
    if not (args.resume and files.last.is_file()):
        return FitState(fingerprint), None
    state, best = resume(files, fingerprint, learner.model, learner.optimizer, learner.scaler)
    last = state.history[-1] if state.history else {}
    if learner.dtype == torch.bfloat16 and (last.get("precision") == "fp32" or last.get("bf16_fallback")):
        learner.dtype = None  # the bf16 check failed before the interruption
    if learner.ema is not None:
        learner.ema = make_ema(learner.model, args.ema)  # the average restarts from the resumed weights
    log.info(
        "%s: resuming after epoch %d (best AUC %.4f at epoch %d)",
        learner.arch,
        state.epoch,
        state.best_auc,
        state.best_epoch,
    )
    return state, best


def _record(
    state: FitState, epoch: int, train_loss: float, result: Evaluation, seconds: float, extra: dict[str, Any]
) -> bool:
    """Add the epoch to the state; True when it beats the best so far (AUC, then loss on a tie)."""
    state.epoch = epoch
    state.history.append(
        {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": result.loss,
            "val_auc": result.auc,
            "seconds": seconds,
            **extra,
        }
    )
    improved = result.auc > state.best_auc or (result.auc == state.best_auc and result.loss < state.best_loss)
    if improved:
        state.best_auc, state.best_loss, state.best_epoch, state.bad_epochs = (
            result.auc,
            result.loss,
            epoch,
            0,
        )
    else:
        state.bad_epochs += 1
    return improved


def _one_epoch(
    learner: Learner,
    args: TrainArgs,
    train: DecodedSet,
    val: DecodedSet,
    epoch: int,
    device: torch.device,
    on_batch: Callable[[float], None],
) -> tuple[float, Evaluation, dict[str, Any]]:
    """Train for one seeded epoch, then evaluate on validation in fp32: (mean training loss, evaluation,
    what history records about precision)."""
    seed_everything(_epoch_seed(args.seed, epoch))
    augmentation = make_augmentation(args.augment, args.hflip)
    loader = _train_loader(train, augmentation.crop, args, epoch, device)
    steps = len(loader)
    set_train_mode(learner.model, learner.arch, frozen_backbone=learner.frozen)
    train_loss = train_one_epoch(
        learner.model,
        learner.criterion,
        learner.optimizer,
        loader,
        device,
        dtype=learner.dtype,
        scaler=learner.scaler,
        schedule=lambda step: lr_at(args, (epoch - 1) * steps + step, steps),
        augment=augmentation.batch,
        ema=learner.ema,
        on_batch=on_batch,
    )
    if args.recalibrate_bn and not learner.frozen:
        recalibrate_batchnorm(learner.scored, train, device, args.batch_size)
    result = evaluate(learner.scored, val, device, criterion=learner.criterion)
    return train_loss, result, _precision_check(learner, val, result, device)


def _precision_check(
    learner: Learner, val: DecodedSet, fp32: Evaluation, device: torch.device
) -> dict[str, Any]:
    """With bf16 training, validation AUC also in bf16: past the tolerance the run continues in fp32."""
    record: dict[str, Any] = {"precision": label(learner.dtype)}
    if learner.dtype != torch.bfloat16:
        return record
    gap = abs(evaluate(learner.scored, val, device, dtype=torch.bfloat16).auc - fp32.auc)
    record["bf16_auc_gap"] = gap
    if not gap <= BF16_AUC_TOLERANCE:  # NaN (one class) counts as a failure too
        log.warning(
            "%s: bf16 moved validation AUC by %.4f (tolerance %.4f): training on in fp32",
            learner.arch,
            gap,
            BF16_AUC_TOLERANCE,
        )
        learner.dtype = None
        record["bf16_fallback"] = True
    return record


def fit_architecture(
    arch: str,
    args: TrainArgs,
    train: DecodedSet,
    val: DecodedSet,
    device: torch.device,
    *,
    progress: Progress | None = None,
) -> FitResult:
    """Train one network, checkpointing every epoch; returns it holding its best-validation weights."""
    seed_everything(args.seed)
    learner = build_learner(arch, args, device)
    files = CheckpointFiles(args.effective_checkpoint_dir / arch)
    state, best_weights = _start(learner, args, files, _fingerprint(arch, args, train, val))
    bar = EpochBar(progress, arch, args.epochs, state.epoch)
    for epoch in range(state.epoch + 1, args.epochs + 1):
        if state.stopped_early:
            break
        started = time.perf_counter()
        train_loss, result, extra = _one_epoch(learner, args, train, val, epoch, device, bar.batch(epoch))
        seconds = time.perf_counter() - started
        if _record(state, epoch, train_loss, result, seconds, extra):
            best_weights = clone_weights(learner.scored)
            save_best(files, learner.scored, state)
        state.stopped_early = args.early_stopping is not None and state.bad_epochs >= args.early_stopping
        save_last(files, learner.model, learner.optimizer, state, learner.scaler)
        log.info(
            "%s epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f (best %.4f @ %d), %.1fs",
            arch, epoch, args.epochs, train_loss, result.loss, result.auc, state.best_auc, state.best_epoch,
            seconds,
        )  # fmt: skip
        bar.epoch_done(epoch, f"loss {train_loss:.4f}  val AUC {result.auc:.4f}")
        if state.stopped_early:
            log.info(
                "%s: early stopping after %d epochs without a better validation AUC", arch, state.bad_epochs
            )
    if best_weights is not None:
        learner.model.load_state_dict(best_weights)
    learner.model.eval()
    return FitResult(model=learner.model, state=state)


@contextlib.contextmanager
def _reproducible(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the block (when ``enabled``); torch's previous choice restored after."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if enabled:
        if device.type == "cuda":
            # cuBLAS is only deterministic with a fixed workspace; must be set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.backends.cudnn.benchmark = previous_benchmark


def _validate(
    fits: dict[str, FitResult], val: DecodedSet, args: TrainArgs, device: torch.device
) -> ValidationRecord:
    """Temperatures, then thresholds on the calibrated probabilities, and the bundle's validation metrics,
    from the trained networks' logits on validation."""
    logits = {arch: evaluate(fit.model, val, device).logits for arch, fit in fits.items()}
    record = validation_record(val.labels.numpy(), logits, args.target_sensitivity)
    if args.bf16_check_images > 0:
        models = {arch: fit.model for arch, fit in fits.items()}
        record.metrics[BF16_CHECK_KEY] = bf16_check(
            models, val.images, args.bf16_check_images, record.temperatures
        )
    return record


def _int8(
    fits: dict[str, FitResult],
    train: DecodedSet,
    val: DecodedSet,
    args: TrainArgs,
    temperatures: dict[str, float],
) -> tuple[dict[str, bytes], dict[str, Any]] | None:
    """int8 networks calibrated on training images (at the input's size, not the cache's) and checked on
    validation, when asked for and the engine is installed (else bf16/fp32 only, and the log says so)."""
    if args.int8_calibration_images <= 0:
        return None
    if (missing := engine_missing()) is not None:
        log.warning("bundle without int8 networks: %s", missing)
        return None
    models = {arch: fit.model.to("cpu").float() for arch, fit in fits.items()}
    calibration = to_input_size(calibration_subset(train.images, args.int8_calibration_images, args.seed))
    return quantize_models(models, calibration, val.images, val.labels.numpy(), temperatures)


def _report_on_test(bundle: Bundle, test: Sequence[Sample], args: TrainArgs) -> None:
    """Evaluate the new bundle on the held-out test samples as ``deepcovid evaluate`` would."""
    report_dir = args.effective_report_dir
    write_samples_csv(test, report_dir / "test_set.csv")
    evaluate_bundle(bundle, test, report_dir, device=args.device, batch_size=args.batch_size, record_db=False)
    log.info("test report in %s", report_dir)


def main(args: TrainArgs) -> Bundle:
    """Train every requested network, fit temperatures then choose thresholds on validation data, write
    the bundle.

    Returns the saved bundle. With a test set, also writes an evaluation report.
    """
    started_at, clock = datetime.now(timezone.utc), time.perf_counter()
    device = resolve_device(args.device)
    set_training_threads(device)
    with _reproducible(args.deterministic, device):
        split, train, val = prepare_data(args)
        with progress_display(args.progress) as progress:
            fits = {
                arch: fit_architecture(arch, args, train, val, device, progress=progress)
                for arch in args.archs
            }

    record = _validate(fits, val, args, device)
    int8 = _int8(fits, train, val, args, record.temperatures)
    states = {arch: fit.state for arch, fit in fits.items()}
    made = provenance(args, split, (train, val), states, device, started_at=started_at, clock=clock)
    bundle = save_bundle(
        args.out,
        {arch: fit.model.to("cpu").float() for arch, fit in fits.items()},
        thresholds=record.thresholds,
        temperatures=record.temperatures,
        ensemble_policy=POLICY,
        ensemble_threshold=record.ensemble_threshold,
        provenance=made,
        metrics={"validation": record.metrics},
        int8=int8,
    )
    log.info("wrote bundle %s to %s", bundle.bundle_id, args.out)
    if split.test:
        _report_on_test(bundle, split.test, args)
    return bundle
