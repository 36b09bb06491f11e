"""``deepcovid explain``: Grad-CAM overlays for a handful of files, with no database needed."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape

from cli.render import console, fail, rows_table, score, show
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import get_settings

if TYPE_CHECKING:
    from deepcovid.bundle import Bundle

INDEX = "index.csv"
INDEX_COLUMNS = ("overlay", "image", "map", "probability", "failure")


def explain_command(
    images: list[str] = typer.Argument(..., help="Image files (PNG, JPEG, DICOM, ...)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the overlays and index.csv to."),
    bundle: Optional[str] = typer.Option(
        None, "--bundle", help="Bundle directory or installed bundle id; default: the active bundle."
    ),
    arch: str = typer.Option("ensemble", "--arch", help="A network's name, ensemble, or all."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Draw where the networks looked (Grad-CAM for the COVID class) on each image, as PNG overlays.

    Overlays get opaque names (0001-ensemble.png, ...); index.csv maps each to the path given. A file
    that cannot be read or decoded is reported in one line and the others are explained; exit 1 then.
    """
    from deepcovid.decode import read_file
    from deepcovid.ensemble import Ensemble  # torch: kept out of CLI start-up
    from deepcovid.errors import ImageError
    from deepcovid.explain import explain_bytes
    from deepcovid.overlay import overlay_png

    loaded = _bundle(bundle)
    names = _maps(arch, loaded.architectures)
    _writable(out)
    # Grad-CAM reads the torch networks' activations: load those, not the int8 ones (which keep none).
    no_int8 = get_settings().model_copy(update={"cpu_int8": "off"})
    ensemble = Ensemble.from_bundle(loaded, device=device, settings=no_int8)
    index: list[tuple[str, str, str, str, str]] = []
    failed = 0
    for number, image in enumerate(images, start=1):
        try:
            explained = explain_bytes(ensemble, read_file(image), name=image)
        except ImageError as exc:
            failed += 1
            detail = f": {exc.detail}" if exc.detail else ""
            console.print(
                f"[bold red]FAILED[/]  {escape(image)}  {exc.reason}{escape(detail)}",
                highlight=False,
                soft_wrap=True,
            )
            index.append(("", image, "", "", exc.reason))
            continue
        for name in names:
            probability = explained.explanation.probabilities[name]
            overlay = f"{number:04d}-{name}.png"
            caption = f"Grad-CAM {name}, P(COVID) {score(probability)}, bundle {loaded.bundle_id[:12]}"
            png = overlay_png(
                explained.pixels, explained.explanation.maps[name], explained.geometry, caption=caption
            )
            (out / overlay).write_bytes(png)
            index.append((overlay, image, name, f"{probability:.6f}", ""))
    with open(out / INDEX, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(index)
    rows = [(o, m, score(float(p)), i) for o, i, m, p, f in index if not f]
    show(rows_table(f"Overlays in {out}", ("overlay", "map", "P(COVID)", "image"), rows, right=("P(COVID)",)))
    if failed:
        raise typer.Exit(int(ExitCode.FAILURES))


def _maps(arch: str, architectures: tuple[str, ...]) -> list[str]:
    """The maps ``--arch`` asks for, in drawing order."""
    from deepcovid.results import ENSEMBLE_KEY

    if arch == "all":
        return [*architectures, ENSEMBLE_KEY]
    if arch == ENSEMBLE_KEY or arch in architectures:
        return [arch]
    choices = ", ".join((*architectures, ENSEMBLE_KEY, "all"))
    raise UserError(
        ExitCode.USAGE, f"--arch {arch}: this bundle has no such network; choose one of {choices}"
    )


def _bundle(bundle: str | None) -> Bundle:
    """A bundle directory or installed id needs no database; no ``--bundle`` reads the active one."""
    from deepcovid.bundle import BundleError, find_bundle, load_bundle

    bundles_dir = get_settings().effective_bundles_dir
    try:
        if bundle and Path(bundle).expanduser().is_dir():
            return load_bundle(Path(bundle).expanduser())
        if bundle:
            return find_bundle(bundle, bundles_dir)
    except BundleError as exc:
        raise UserError(ExitCode.NO_BUNDLE, f"{bundle}: not a usable bundle: {exc}") from None
    from cli.jobs import database
    from db.registry import active_bundle

    try:
        record = active_bundle(database())
    except UserError as exc:  # e.g. a fresh data dir: no registry to read an active bundle from
        raise UserError(ExitCode.NO_BUNDLE, f"no --bundle and no active bundle ({exc.message})") from None
    if record is None:
        raise UserError(ExitCode.NO_BUNDLE, "no active bundle: pass --bundle BUNDLE_DIR or a bundle id")
    try:
        return find_bundle(record.bundle_id, bundles_dir)
    except BundleError as exc:
        raise UserError(
            ExitCode.NO_BUNDLE, f"active bundle {record.bundle_id} is not usable: {exc}"
        ) from None


def _writable(out: Path) -> None:
    """Make ``--out`` and prove it takes files before any work, or say why not in one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise fail(
            f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__}); choose another folder",
            ExitCode.USAGE,
        ) from None
