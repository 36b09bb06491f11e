"""Labelled chest X-rays for training and evaluation: reading, patient-disjoint splits, cached tensors.

Images go through exactly the inference path (``deepcovid.preprocess.load_image`` then ``collate``),
so a model is trained on the same crop it later scores. Every image is decoded once into the training
cache (``training.cache``): uint8, memory-mapped, reused by later runs; epochs then cost only compute.
Training images are cached at 256 (room for augmentation), validation images at exactly the 224 input.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split
from torch.utils.data import WeightedRandomSampler

from deepcovid import defaults
from deepcovid.batches import collate
from deepcovid.decode import read_file
from deepcovid.errors import ImageError
from deepcovid.formats import IMAGE_SUFFIXES
from deepcovid.preprocess import INPUT_SIZE, load_image
from deepcovid.settings import get_settings
from training.args import TrainArgs
from training.cache import TrainingCache, cache_root

log = logging.getLogger(__name__)

LABELS = ("non_covid", "covid")  # index = class, matching deepcovid.networks.CLASSES
_LABEL_VALUES = {
    "covid": 1,
    "covid-19": 1,
    "covid19": 1,
    "1": 1,
    "positive": 1,
    "non_covid": 0,
    "non-covid": 0,
    "noncovid": 0,
    "0": 0,
    "negative": 0,
}
_FOLDER_SUFFIXES = IMAGE_SUFFIXES | {""}  # a labelled folder may hold extensionless files (DICOM often)


class DataError(ValueError):
    """The labelled data cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``name`` is its path as the data source spells it (relative), for identity."""

    path: Path
    label: int
    name: str
    patient_id: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # every column of its CSV row (for --by / --test-where)

    def column(self, name: str) -> str | None:
        """The value of CSV column ``name`` for this sample, None when its data had no such column."""
        return dict(self.columns).get(name)


@dataclass
class Split:
    """Train / validation / optional test samples and whether patients kept them apart."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    by_patient: bool = False

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for part in ("train", "val", "test"):
            samples = getattr(self, part)
            if samples:
                out[part] = class_counts(samples)
        return out


def parse_label(value: str) -> int:
    try:
        return _LABEL_VALUES[value.strip().lower()]
    except KeyError:
        raise DataError(f"unknown label {value!r}: use covid or non_covid (or 1 / 0)") from None


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    labels = [s.label for s in samples]
    return {LABELS[1]: labels.count(1), LABELS[0]: labels.count(0)}


def load_labelled(source: Path) -> list[Sample]:
    """Read a labelled folder (``covid/``, ``non_covid/``) or a CSV (``path|filename,label[,patient_id]``)."""
    source = Path(source)
    if source.is_dir():
        samples = _load_folder(source)
    elif source.is_file():
        samples = _load_csv(source)
    else:
        raise DataError(f"{source}: no such folder or CSV file")
    if not samples:
        raise DataError(f"{source}: no labelled images found")
    return samples


def _load_folder(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    found = False
    for label_dir in sorted(root.iterdir()):
        if not label_dir.is_dir() or label_dir.name.lower() not in _LABEL_VALUES:
            continue
        found = True
        label = parse_label(label_dir.name)
        for path in sorted(label_dir.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in _FOLDER_SUFFIXES:
                samples.append(Sample(path=path, label=label, name=path.relative_to(root).as_posix()))
    if not found:
        raise DataError(f"{root}: expected sub-folders covid/ and non_covid/ (or a CSV file)")
    return samples


def _load_csv(csv_path: Path) -> list[Sample]:
    base = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        path_col = columns.get("path") or columns.get("filename") or columns.get("file")
        label_col = columns.get("label")
        if path_col is None or label_col is None:
            raise DataError(
                f"{csv_path}: needs columns path (or filename) and label, has {reader.fieldnames}"
            )
        patient_col = columns.get("patient_id")
        samples = []
        for line, row in enumerate(reader, start=2):
            name = (row.get(path_col) or "").strip()
            if not name:
                raise DataError(f"{csv_path}:{line}: empty path")
            try:
                label = parse_label(row.get(label_col) or "")
            except DataError as exc:
                raise DataError(f"{csv_path}:{line}: {exc}") from None
            patient = (row.get(patient_col) or "").strip() if patient_col else ""
            path = Path(name) if Path(name).is_absolute() else base / name
            columns = tuple((k.strip(), (v or "").strip()) for k, v in row.items() if k is not None)
            samples.append(
                Sample(
                    path=path,
                    label=label,
                    name=Path(name).as_posix(),
                    patient_id=patient or None,
                    columns=columns,
                )
            )
    return samples


def data_id(samples: Sequence[Sample]) -> str:
    """sha256 of the sorted (name, label) list: two evaluations with equal ids used the same data."""
    items = sorted((s.name, LABELS[s.label]) for s in samples)
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def _groups(samples: Sequence[Sample]) -> np.ndarray | None:
    """Patient ids as split groups; images without an id are their own group. None: no ids at all."""
    if not any(s.patient_id for s in samples):
        return None
    return np.array([s.patient_id if s.patient_id else f"\0image:{s.name}" for s in samples])


def _split_off(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], bool]:
    """Split ``fraction`` of samples off (stratified by label; by patient when ids exist)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be between 0 and 1, got {fraction}")
    labels = np.array([s.label for s in samples])
    index = np.arange(len(samples))
    groups = _groups(samples)
    if groups is None:
        stratify = labels if min(np.bincount(labels, minlength=2)) >= 2 else None
        keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
        return [samples[i] for i in keep], [samples[i] for i in held], False
    n_splits = max(2, round(1 / fraction))
    try:
        # One fold of a stratified group K-fold: patient-disjoint and close to the class balance.
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep, held = next(splitter.split(index, labels, groups))
    except ValueError:
        # Too few patients per class for stratified folds: still patient-disjoint, just unstratified.
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        keep, held = next(splitter.split(index, labels, groups))
    return [samples[i] for i in keep], [samples[i] for i in held], True


def split_samples(
    samples: Sequence[Sample],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Seeded train/validation(/test) split; no patient ever appears on two sides."""
    test: list[Sample] = []
    rest = list(samples)
    by_patient = _groups(samples) is not None
    if test_fraction > 0:
        rest, test, _ = _split_off(rest, test_fraction, seed)
    # val_fraction is of the whole set; after the test split it is a larger share of what remains.
    share = val_fraction / (1.0 - test_fraction) if test_fraction > 0 else val_fraction
    train, val, _ = _split_off(rest, min(share, 0.9), seed + 1)
    for name, part in (("train", train), ("validation", val)):
        if len({s.label for s in part}) < 2:
            raise DataError(
                f"the {name} split has only one class ({class_counts(part)}); "
                "add images or change the fractions"
            )
    return Split(train=train, val=val, test=test, by_patient=by_patient)


def hold_out_group(samples: Sequence[Sample], where: str) -> tuple[list[Sample], list[Sample]]:
    """(the samples whose CSV column equals the value in ``where`` = "COLUMN=VALUE", the rest without
    any patient of that group): a whole source or view as the test set."""
    column, _, value = where.partition("=")
    column, value = column.strip(), value.strip()
    known = {name for s in samples for name, _ in s.columns}
    if column not in known:
        names = ", ".join(sorted(known)) or "none: use a CSV"
        raise DataError(f"--test-where: no column {column!r} in the labels (columns: {names})")
    held = [s for s in samples if s.column(column) == value]
    if not held:
        values = sorted({s.column(column) or "" for s in samples})
        raise DataError(f"--test-where: no row has {column} = {value!r} (values: {', '.join(values[:20])})")
    patients = {s.patient_id for s in held if s.patient_id}
    rest = [s for s in samples if s.column(column) != value and s.patient_id not in patients]
    if not rest:
        raise DataError(
            f"--test-where: every patient has an image with {column} = {value!r}: nothing to train on"
        )
    dropped = len(samples) - len(held) - len(rest)
    if dropped:
        log.info("--test-where: %d image(s) of held-out patients outside the group left out too", dropped)
    return held, rest


@dataclass
class DecodedSet:
    """Samples decoded to uint8 ``images`` [N, 3, side, side] (224, the model input, unless cached larger
    for augmentation) and ``labels`` int64 [N]."""

    samples: list[Sample]
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of undecodable files


def decode_samples(samples: Sequence[Sample], *, max_pixels: int | None = None) -> DecodedSet:
    """Decode once through the inference preprocessing; files that fail are skipped and listed.

    Read and decoded as the screener does (``read_file`` refuses what storage would, ``load_image`` is the
    pipeline's decode and preprocess), so a model trains on exactly the input it will later score.
    """
    kept: list[Sample] = []
    arrays: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for sample in samples:
        try:
            pixels, _info = load_image(read_file(sample.path), name=sample.path.name, max_pixels=max_pixels)
        except ImageError as exc:
            skipped.append((sample.name, exc.reason))
            continue
        kept.append(sample)
        arrays.append(pixels)
    if skipped:
        log.warning("skipped %d undecodable image(s), e.g. %s", len(skipped), skipped[0])
    if arrays:
        images = torch.cat([collate(arrays[i : i + 64]) for i in range(0, len(arrays), 64)])
    else:
        images = torch.empty((0, 3, 224, 224), dtype=torch.uint8)
    labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
    return DecodedSet(samples=kept, images=images, labels=labels, skipped=skipped)


def cached_samples(
    samples: Sequence[Sample], *, side: int, max_pixels: int | None = None, root: Path | None = None
) -> DecodedSet:
    """``decode_samples`` through the training cache at ``side`` (``root``: default under the data dir);
    at 224 the pixels are the same, at 256 they are the same crop with room for augmentation."""
    cache = TrainingCache(root or cache_root(get_settings().data_dir), side)
    rows = cache.load([s.path for s in samples], max_pixels=max_pixels)
    skipped = [(samples[i].name, reason) for i, reason in rows.skipped]
    if skipped:
        log.warning("skipped %d undecodable image(s), e.g. %s", len(skipped), skipped[0])
    kept = [samples[i] for i in rows.kept]
    labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
    return DecodedSet(samples=kept, images=rows.images, labels=labels, skipped=skipped)


def _decode_split(split: Split, args: TrainArgs) -> tuple[DecodedSet, DecodedSet]:
    max_pixels = get_settings().max_image_pixels
    if not args.cache:
        return decode_samples(split.train, max_pixels=max_pixels), decode_samples(
            split.val, max_pixels=max_pixels
        )
    root = Path(args.cache_dir) if args.cache_dir else None
    train = cached_samples(split.train, side=defaults.TRAIN_CACHE_SIDE, max_pixels=max_pixels, root=root)
    val = cached_samples(split.val, side=INPUT_SIZE, max_pixels=max_pixels, root=root)
    return train, val


def prepare_data(args: TrainArgs) -> tuple[Split, DecodedSet, DecodedSet]:
    """Read, split and decode; the test samples (``split.test``) stay undecoded for ``evaluate_bundle``."""
    samples = load_labelled(args.data)
    if args.test_where is not None:
        held, rest = hold_out_group(samples, args.test_where)
        split = split_samples(rest, val_fraction=args.val_fraction, seed=args.seed)
        split.test = held
    elif args.test is not None:
        split = split_samples(samples, val_fraction=args.val_fraction, seed=args.seed)
        split.test = load_labelled(args.test)
        _warn_on_overlap(split)
    else:
        split = split_samples(
            samples, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed
        )
    train, val = _decode_split(split, args)
    for name, part in (("training", train), ("validation", val)):
        if len(set(part.labels.tolist())) < 2:
            raise ValueError(f"the {name} split has only one decodable class: {class_counts(part.samples)}")
    log.info(
        "data: train %s, validation %s%s, split by %s",
        class_counts(train.samples),
        class_counts(val.samples),
        f", test {class_counts(split.test)}" if split.test else "",
        "patient" if split.by_patient else "image",
    )
    return split, train, val


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


def balanced_sampler(
    labels: torch.Tensor, *, seed: int, num_samples: int | None = None
) -> WeightedRandomSampler:
    """Over-sample the minority class so each batch is about half COVID (paper: 84 COVID -> 420).

    Drawn with replacement from a seeded generator; the default epoch length is twice the majority
    class, so every majority image is seen about once per epoch.
    """
    counts = torch.bincount(labels, minlength=2).to(torch.float64)
    weights = (1.0 / counts.clamp(min=1))[labels]
    generator = torch.Generator().manual_seed(seed)
    total = num_samples or int(2 * counts.max().item())
    return WeightedRandomSampler(weights, num_samples=total, replacement=True, generator=generator)


def write_samples_csv(samples: Sequence[Sample], path: Path) -> None:
    """Write samples as a CSV ``deepcovid evaluate`` reads (absolute paths, so it works from anywhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for s in samples:
            writer.writerow([str(s.path.resolve()), LABELS[s.label]])
