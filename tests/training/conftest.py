"""Fixtures for the training tests: synthetic labelled X-rays, one shared small training run, a CLI."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.fixtures.images import write_labelled_folder

# One small network trained from scratch on every layer: the cheapest setting that learns the synthetic
# opacities on two shared CPU cores. Shared by the AUC, threshold and evaluation tests.
TRAIN_ARCH = "resnet18"
TRAIN_EPOCHS = 2


@pytest.fixture(scope="session")
def separable_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 COVID-like (opacities) and 20 clear 80 px synthetic radiographs in covid/ and non_covid/."""
    root = tmp_path_factory.mktemp("separable")
    write_labelled_folder(root, 20, 20, size=80, seed=11)
    return root


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disjoint synthetic test set (different seed), 8 per class."""
    root = tmp_path_factory.mktemp("heldout")
    write_labelled_folder(root, 8, 8, size=96, seed=12)
    return root


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, separable_data: Path
):  # -> (Bundle, TrainArgs, seconds)
    """A bundle from a short from-scratch run (``--pretrained none --finetune all``) on CPU."""
    import time

    from training.args import TrainArgs
    from training.train import main

    out = tmp_path_factory.mktemp("trained") / "bundle"
    args = TrainArgs(
        data=separable_data,
        out=out,
        archs=(TRAIN_ARCH,),
        pretrained="none",
        finetune="all",
        epochs=TRAIN_EPOCHS,
        batch_size=16,
        lr=1e-3,
        seed=0,
        device="cpu",
        progress=False,
        cache_dir=out.parent / "cache",
    )
    started = time.perf_counter()
    bundle = main(args)
    return bundle, args, time.perf_counter() - started


def write_patient_csv(root: Path, patients: int, images_per_patient: int, *, covid_every: int = 2) -> Path:
    """A CSV (path,label,patient_id) over existing synthetic images, several images per patient."""
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "view", "patient_id"])
        for p in range(patients):
            label = "covid" if p % covid_every == 0 else "non_covid"
            for i in range(images_per_patient):
                writer.writerow([f"{label}/p{p:03d}_{i}.png", label, "PA", f"site:{p}"])
    return csv_path


@pytest.fixture
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private data dir and bundles dir for code that reads Settings; returns the bundles dir."""
    from deepcovid.settings import get_settings

    bundles = tmp_path / "installed-bundles"
    monkeypatch.setenv("DEEPCOVID_DATA_DIR", str(tmp_path / "data-dir"))
    monkeypatch.setenv("DEEPCOVID_BUNDLES_DIR", str(bundles))
    get_settings.cache_clear()
    yield bundles
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def training_cli() -> typer.Typer:
    from cli.main import app

    return app


@pytest.fixture
def cli_runner() -> CliRunner:
    return CliRunner()
