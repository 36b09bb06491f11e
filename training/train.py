"""Fine-tune the Deep-COVID networks and write a bundle with thresholds chosen on validation data.

Laid out like torchvision's references/classification/train.py: ``train_one_epoch``, ``evaluate`` and
``main(args)``. Defaults are the paper's: ImageNet weights, only the last layer trained, cross-entropy,
Adam at 1e-4, batches of 100, 100 epochs, 224x224 inputs, COVID images augmented and over-sampled.
Every epoch is seeded from (seed, epoch), so a resumed run replays exactly what a straight run does.
"""

from __future__ import annotations

import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deepcovid.networks import ARCHITECTURES, COVID_INDEX
from deepcovid.precision import BF16_CHECK_KEY
from training.checkpoint import load_checkpoint, read_state, save_checkpoint
from training.data import (
    CachedImages,
    DecodedSet,
    Split,
    balanced_sampler,
    class_counts,
    data_id,
    decode_samples,
    load_labelled,
    make_augmentation,
    split_samples,
    write_samples_csv,
)
from training.metrics import operating_point, roc_auc
from training.thresholds import DEFAULT_TARGET_SENSITIVITY, choose_thresholds

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """A checkpoint exists but was made with different settings or data than this run."""


@dataclass
class TrainArgs:
    """Everything a training run depends on. Defaults follow Minaee et al. (2020)."""

    data: Path
    out: Path
    test: Path | None = None
    archs: Sequence[str] = ARCHITECTURES
    pretrained: str = "imagenet"  # imagenet | none | path to a checkpoint file or directory
    finetune: str = "head"  # head (only the last layer, as in the paper) | all
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
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
    bf16_check_images: int = 512  # validation images scored in bf16 and fp32 to record the drift; 0: none

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        self.archs = tuple(self.archs) or ARCHITECTURES
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


@dataclass
class Evaluation:
    """One pass over labelled data: COVID probabilities, labels, mean loss and ROC AUC."""

    probabilities: np.ndarray
    labels: np.ndarray
    loss: float
    auc: float


@dataclass
class FitResult:
    model: nn.Module
    epochs_run: int
    best_epoch: int
    best_auc: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(
        device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda"
    )


def _to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from deepcovid.preprocess import normalize

    return normalize(images.to(device, non_blocking=True))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss. The caller sets train mode."""
    total, count = 0.0, 0
    use_amp = scaler is not None and scaler.is_enabled()
    for images, labels in loader:
        inputs = _to_model_input(images, device)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, use_amp):
            loss = criterion(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach()) * labels.shape[0]
        count += labels.shape[0]
        if on_batch is not None:
            on_batch(float(loss.detach()))
    return total / max(count, 1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    criterion: nn.Module | None = None,
    amp: bool = False,
) -> Evaluation:
    """COVID probabilities (softmax, class ``COVID_INDEX``) over ``loader`` with loss and AUC."""
    criterion = criterion or nn.CrossEntropyLoss()
    model.eval()
    probabilities, labels_all = [], []
    total, count = 0.0, 0
    for images, labels in loader:
        inputs = _to_model_input(images, device)
        labels = labels.to(device)
        with _autocast(device, amp):
            logits = model(inputs)
        logits = logits.float()
        total += float(criterion(logits, labels)) * labels.shape[0]
        count += labels.shape[0]
        probabilities.append(logits.softmax(dim=1)[:, COVID_INDEX].cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    p = np.concatenate(probabilities) if probabilities else np.empty(0)
    y = np.concatenate(labels_all) if labels_all else np.empty(0, dtype=int)
    return Evaluation(probabilities=p, labels=y, loss=total / max(count, 1), auc=roc_auc(y, p))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, decoded: DecodedSet, device: torch.device, batch_size: int
) -> None:
    """Recompute BatchNorm running statistics on the (unaugmented) training images.

    When every layer trains, the running averages lag behind weights that moved in the last few
    hundred steps; evaluation then sees stale statistics and validation AUC can even invert early on
    (seen on small data). One forward pass with cumulative averaging makes them match the weights.
    """
    from torch.optim.swa_utils import update_bn

    batches = (
        _to_model_input(decoded.images[i : i + batch_size], device)
        for i in range(0, int(decoded.labels.shape[0]), batch_size)
    )
    update_bn(batches, model)


def _fingerprint(arch: str, args: TrainArgs, train: DecodedSet, val: DecodedSet) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (the epoch count may grow)."""
    return {
        "arch": arch,
        "pretrained": str(args.pretrained),
        "finetune": args.finetune,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "hflip": args.hflip,
        "recalibrate_bn": args.recalibrate_bn,
        "train_data_id": data_id(train.samples),
        "val_data_id": data_id(val.samples),
    }


def _train_loader(train: DecodedSet, args: TrainArgs, epoch: int, device: torch.device) -> DataLoader:
    # Both classes are augmented: augmenting COVID alone lets a network learn "rotated = COVID"
    # (black corners, softer crops) instead of the disease; over-sampling still balances the classes.
    dataset = CachedImages(train, augment=make_augmentation(args.hflip), augment_labels=(0, 1))
    sampler = balanced_sampler(train.labels, seed=_epoch_seed(args.seed, epoch))
    generator = torch.Generator().manual_seed(_epoch_seed(args.seed, epoch))
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        # BatchNorm cannot train on a batch of one.
        drop_last=len(sampler) % args.batch_size == 1,
    )


def _eval_loader(decoded: DecodedSet, args: TrainArgs, device: torch.device) -> DataLoader:
    return DataLoader(
        CachedImages(decoded),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )


def fit_architecture(
    arch: str,
    args: TrainArgs,
    train: DecodedSet,
    val: DecodedSet,
    device: torch.device,
    *,
    progress: Any = None,
) -> FitResult:
    """Train one network, checkpointing every epoch; returns it holding its best-validation weights."""
    from deepcovid.networks import build_network, freeze_backbone, head_parameters, set_train_mode
    from deepcovid.settings import get_settings

    seed_everything(args.seed)
    model = build_network(arch, args.pretrained, settings=get_settings())
    frozen = args.finetune == "head"
    if frozen:
        freeze_backbone(model, arch)
        parameters = head_parameters(model, arch)
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss()

    ckpt_dir = args.effective_checkpoint_dir / arch
    last_path, best_path = ckpt_dir / "last.safetensors", ckpt_dir / "best.safetensors"
    fingerprint = _fingerprint(arch, args, train, val)
    start_epoch, history = 1, []
    best_auc, best_loss, best_epoch, bad_epochs, stopped = -math.inf, math.inf, 0, 0, False
    best_state: dict[str, torch.Tensor] | None = None

    if args.resume and last_path.is_file():
        saved = read_state(last_path)
        if saved["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            raise ResumeError(
                f"checkpoint {last_path} was made with different {', '.join(changed)}; "
                f"start without --resume or use another --checkpoint-dir"
            )
        load_checkpoint(last_path, model, optimizer, restore_rng=False)
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        start_epoch = saved["epoch"] + 1
        history = saved["history"]
        best_auc, best_loss, best_epoch = saved["best_auc"], saved["best_loss"], saved["best_epoch"]
        bad_epochs, stopped = saved["bad_epochs"], saved["stopped_early"]
        best_model = _clone_state(model)
        load_checkpoint(best_path, model, restore_rng=False)
        best_state = _clone_state(model)
        model.load_state_dict(best_model)
        log.info(
            "%s: resuming after epoch %d (best AUC %.4f at epoch %d)",
            arch,
            saved["epoch"],
            best_auc,
            best_epoch,
        )

    task = None
    if progress is not None:
        task = progress.add_task(arch, total=args.epochs, completed=start_epoch - 1, status="")
    val_loader = _eval_loader(val, args, device)
    for epoch in range(start_epoch, args.epochs + 1 if not stopped else start_epoch):
        seed_everything(_epoch_seed(args.seed, epoch))
        loader = _train_loader(train, args, epoch, device)
        set_train_mode(model, arch, frozen_backbone=frozen)
        started = time.perf_counter()

        def on_batch(loss: float, _epoch: int = epoch) -> None:
            if progress is not None:
                progress.update(task, status=f"epoch {_epoch} loss {loss:.4f}")

        train_loss = train_one_epoch(
            model, criterion, optimizer, loader, device, scaler=scaler, on_batch=on_batch
        )
        if args.recalibrate_bn and not frozen:
            recalibrate_batchnorm(model, train, device, args.batch_size)
        result = evaluate(model, val_loader, device, criterion=criterion, amp=use_amp)
        seconds = time.perf_counter() - started
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": result.loss,
                "val_auc": result.auc,
                "seconds": seconds,
            }
        )
        improved = result.auc > best_auc or (result.auc == best_auc and result.loss < best_loss)
        if improved:
            best_auc, best_loss, best_epoch, bad_epochs = result.auc, result.loss, epoch, 0
            best_state = _clone_state(model)
            save_checkpoint(best_path, model, state={"epoch": epoch, "val_auc": result.auc}, rng=False)
        else:
            bad_epochs += 1
        stopped = args.early_stopping is not None and bad_epochs >= args.early_stopping
        save_checkpoint(
            last_path,
            model,
            optimizer=optimizer,
            state={
                "fingerprint": fingerprint,
                "epoch": epoch,
                "history": history,
                "best_auc": best_auc,
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "stopped_early": stopped,
                "scaler": scaler.state_dict() if use_amp else None,
            },
        )
        log.info(
            "%s epoch %d/%d: train loss %.4f, val loss %.4f, val AUC %.4f (best %.4f @ %d), %.1fs",
            arch, epoch, args.epochs, train_loss, result.loss, result.auc, best_auc, best_epoch, seconds,
        )  # fmt: skip
        if progress is not None:
            progress.update(task, completed=epoch, status=f"loss {train_loss:.4f}  val AUC {result.auc:.4f}")
        if stopped:
            log.info("%s: early stopping after %d epochs without a better validation AUC", arch, bad_epochs)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        model=model,
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_auc=best_auc,
        stopped_early=stopped,
        history=history,
    )


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def prepare_data(args: TrainArgs) -> tuple[Split, DecodedSet, DecodedSet, list]:
    """Read, split and decode; the test samples stay undecoded for ``evaluate``."""
    from deepcovid.settings import get_settings

    samples = load_labelled(args.data)
    if args.test is not None:
        split = split_samples(samples, val_fraction=args.val_fraction, seed=args.seed)
        split.test = load_labelled(args.test)
        _warn_on_overlap(split)
    else:
        split = split_samples(
            samples, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed
        )
    max_pixels = get_settings().max_image_pixels
    train = decode_samples(split.train, max_pixels=max_pixels)
    val = decode_samples(split.val, max_pixels=max_pixels)
    for name, part in (("training", train), ("validation", val)):
        if len(set(part.labels.tolist())) < 2:
            raise ValueError(f"the {name} split has only one decodable class: {class_counts(part.samples)}")
    return split, train, val, split.test


def _warn_on_overlap(split: Split) -> None:
    """A separate test set that shares patients or files with training data overstates performance."""
    seen = split.train + split.val
    patients = {s.patient_id for s in seen if s.patient_id} & {
        s.patient_id for s in split.test if s.patient_id
    }
    files = {s.path.resolve() for s in seen} & {s.path.resolve() for s in split.test}
    if patients or files:
        log.warning(
            "the test set shares %d patient(s) and %d file(s) with the training/validation data: "
            "its metrics will be optimistic",
            len(patients),
            len(files),
        )


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )


def main(args: TrainArgs) -> Any:
    """Train every requested network, choose thresholds on validation data, write the bundle.

    Returns the saved ``deepcovid.bundle.Bundle``. With a test set, also writes an evaluation report.
    """
    from deepcovid.bundle import save_bundle
    from deepcovid.devices import resolve_device
    from deepcovid.ensemble import combine

    started_at = datetime.now(timezone.utc)
    clock = time.perf_counter()
    device = resolve_device(args.device)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if args.deterministic:
        if device.type == "cuda":
            # cuBLAS is only deterministic with a fixed workspace; must be set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        split, train, val, test = prepare_data(args)
        log.info(
            "data: train %s, validation %s%s, split by %s",
            class_counts(train.samples),
            class_counts(val.samples),
            f", test {class_counts(test)}" if test else "",
            "patient" if split.by_patient else "image",
        )
        fits: dict[str, FitResult] = {}
        with _progress(args.progress) as progress:
            for arch in args.archs:
                fits[arch] = fit_architecture(arch, args, train, val, device, progress=progress)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.backends.cudnn.benchmark = previous_benchmark

    val_loader = _eval_loader(val, args, device)
    probabilities = {
        arch: evaluate(fit.model, val_loader, device).probabilities for arch, fit in fits.items()
    }
    labels = val.labels.numpy()
    placeholder = dict.fromkeys(probabilities, 0.5)
    ensemble_scores = combine(probabilities, placeholder, "mean", 0.5).ensemble_score
    thresholds = choose_thresholds(labels, probabilities, ensemble_scores, target=args.target_sensitivity)
    ensemble_threshold = thresholds.pop("ensemble")

    scores = {**probabilities, "ensemble": ensemble_scores}
    operating = {**thresholds, "ensemble": ensemble_threshold}
    metrics = {
        "validation": {
            "target_sensitivity": args.target_sensitivity,
            "n": int(labels.size),
            "auc": {name: _finite(roc_auc(labels, s)) for name, s in scores.items()},
            "operating_points": {
                name: _json_safe(operating_point(labels, s, operating[name])) for name, s in scores.items()
            },
            "note": "thresholds were chosen on this validation set, so these operating points are optimistic",
        }
    }
    if args.bf16_check_images > 0:
        metrics["validation"][BF16_CHECK_KEY] = bf16_check(fits, val, args.bf16_check_images)
    finished_at = datetime.now(timezone.utc)
    provenance = {
        "data_source": str(args.data.resolve()),
        "data_id": data_id(split.train + split.val),
        "test_source": str(args.test.resolve()) if args.test else None,
        "counts": {
            "train": class_counts(train.samples),
            "val": class_counts(val.samples),
            **({"test": class_counts(test)} if test else {}),
        },
        "patients": _patient_counts(split),
        "patient_split": split.by_patient,
        "skipped_images": len(train.skipped) + len(val.skipped),
        "seed": args.seed,
        "args": args.as_json(),
        "epochs_run": {arch: fit.epochs_run for arch, fit in fits.items()},
        "best_epoch": {arch: fit.best_epoch for arch, fit in fits.items()},
        "stopped_early": {arch: fit.stopped_early for arch, fit in fits.items()},
        "history": {arch: fit.history for arch, fit in fits.items()},
        "device": str(device),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - clock, 1),
    }
    networks = {arch: fit.model.to("cpu").float() for arch, fit in fits.items()}
    bundle = save_bundle(
        args.out,
        networks,
        thresholds=thresholds,
        ensemble_policy="mean",
        ensemble_threshold=ensemble_threshold,
        provenance=_json_safe(provenance),
        metrics=metrics,
    )
    log.info("wrote bundle %s to %s", bundle.bundle_id, args.out)
    if test:
        from training.evaluate import evaluate_bundle

        report_dir = args.effective_report_dir
        write_samples_csv(test, report_dir / "test_set.csv")
        evaluate_bundle(
            bundle, test, report_dir, device=args.device, batch_size=args.batch_size, record_db=False
        )
        log.info("test report in %s", report_dir)
    return bundle


def bf16_check(fits: dict[str, FitResult], val: DecodedSet, limit: int) -> dict[str, float]:
    """Per network, the largest bf16-vs-fp32 change of a COVID probability on up to ``limit`` validation
    images, measured on CPU as workers will run it (BatchNorm folded). Stored in the bundle: a CPU worker
    scores in bf16 only where this stays within its tolerance (``DEEPCOVID_BF16_TOLERANCE``)."""
    import copy

    from deepcovid.networks import prepare_network
    from deepcovid.precision import precision_drift

    cpu = torch.device("cpu")
    served = {arch: prepare_network(copy.deepcopy(fit.model).float(), cpu) for arch, fit in fits.items()}
    drift = precision_drift(served, val.images[:limit], torch.bfloat16, cpu)
    log.info("bf16 vs fp32 on %d validation images: %s", min(limit, len(val.samples)), drift)
    return {arch: round(value, 6) for arch, value in drift.items()}


def _patient_counts(split: Split) -> dict[str, int] | None:
    if not split.by_patient:
        return None
    return {
        part: len({s.patient_id or s.name for s in getattr(split, part)})
        for part in ("train", "val", "test")
        if getattr(split, part)
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf to None (bundle manifests are strict JSON); tuples to lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    from training.cli import run_train

    run_train()
