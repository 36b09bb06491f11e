"""Commands over the core alone: ``config``, ``inspect``, ``bundle init`` and ``bundle show``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from cli.render import console, fail, human, record_table, rows_table, score, show
from deepcovid import defaults
from deepcovid.settings import get_settings

if TYPE_CHECKING:
    from deepcovid.bundle import Bundle


def config_command() -> None:
    """Print the effective settings (from DEEPCOVID_* variables and .env), secrets masked."""
    rows = [(name, f"DEEPCOVID_{name.upper()}", value) for name, value in get_settings().masked().items()]
    show(rows_table("Effective settings", ("setting", "environment variable", "value"), rows))


def inspect_command(
    paths: list[str] = typer.Argument(..., help="Image files or directories (walked recursively)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only failures and the summary."),
) -> None:
    """Decode images and report size, bit depth and format, or why each one fails.

    Directories are walked recursively in sorted order, trying image suffixes
    (.png, .jpg, .dcm, ...) and files without a suffix; other files are skipped.
    Exit code 0 when every image decodes, 1 when some fail, 2 for a missing path.
    Patient data is never printed.
    """
    from deepcovid.inspection import image_files, inspect_files  # numpy and Pillow: kept out of CLI start-up

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise typer.BadParameter(f"no such file or directory: {', '.join(missing)}", param_hint="PATHS")
    files, skipped = image_files(map(Path, paths))
    settings = get_settings()
    failures: Counter[str] = Counter()
    ok = 0
    for report in inspect_files(files, max_pixels=settings.max_image_pixels, threads=settings.decode_threads):
        where = escape(str(report.path))
        if report.reason is None:
            ok += 1
            if not quiet:
                _line(f"[green]ok[/]      {where}  {escape(report.text)}")
        else:
            failures[report.reason] += 1
            _line(f"[bold red]FAILED[/]  {where}  {report.reason}: {escape(report.text)}")

    summary = f"ok {ok}, failed {sum(failures.values())}"
    if failures:
        summary += " (" + ", ".join(f"{r} {n}" for r, n in sorted(failures.items())) + ")"
    if skipped:
        summary += f", skipped {skipped} non-image file{'s' if skipped != 1 else ''}"
    if not files:
        summary += " - no image files found"
    _line(summary)
    if failures:
        raise typer.Exit(code=1)


def _line(text: str) -> None:
    """One line per file, never wrapped, so paths stay whole for grep and copy."""
    console.print(text, highlight=False, soft_wrap=True)


def bundle_init_command(
    out: str = typer.Argument(..., help="New (or empty) directory to write the bundle to."),
    pretrained: str = typer.Option(
        ...,
        "--pretrained",
        help="Initial weights: none (random), imagenet (torch hub cache or "
        "DEEPCOVID_IMAGENET_WEIGHTS_DIR), or a directory holding torchvision's ImageNet checkpoint "
        "files (a file with one --arch).",
    ),
    arch: list[str] = typer.Option([], "--arch", help="Network to include (repeatable); default: all four."),
    policy: str = typer.Option("mean", "--policy", help="Ensemble policy: mean, majority or any."),
    ensemble_threshold: float = typer.Option(
        defaults.ENSEMBLE_THRESHOLD, "--ensemble-threshold", help="Ensemble threshold."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for the freshly initialised heads."),
) -> None:
    """Write an untrained bundle (random or ImageNet backbones, new 2-class heads): tests, first runs."""
    from deepcovid.untrained import init_bundle  # torch: kept out of CLI start-up

    bundle = init_bundle(
        Path(out),
        pretrained=pretrained,
        architectures=arch,
        policy=policy,
        ensemble_threshold=ensemble_threshold,
        seed=seed,
    )
    console.print(f"wrote untrained bundle [bold]{bundle.bundle_id}[/] to {bundle.path}")


def bundle_show_command(
    path: str = typer.Argument(..., help="Bundle directory, or the id of an installed bundle."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Verify a bundle (every file hash and its id) and print its manifest."""
    from deepcovid.bundle import BundleError, find_bundle, load_bundle  # numpy: kept out of CLI start-up

    try:
        if Path(path).exists():
            bundle = load_bundle(Path(path))
        else:
            bundle = find_bundle(path, get_settings().effective_bundles_dir)
    except BundleError as exc:
        raise fail(str(exc)) from None
    if json_output:
        typer.echo(json.dumps(bundle.manifest, indent=2, sort_keys=True))
        return
    show(record_table(f"Bundle {bundle.bundle_id} (verified)", _manifest_rows(bundle)))


def _manifest_rows(bundle: Bundle) -> list[tuple[str, str]]:
    manifest = bundle.manifest
    norm = manifest["normalization"]
    thresholds, temperatures = bundle.thresholds, bundle.temperatures
    rows = [
        ("path", str(bundle.path)),
        ("format", str(manifest["format_version"])),
        ("created", str(bundle.created_at)),
        ("classes", ", ".join(bundle.classes)),
        ("input", f"{manifest['input_size']}x{manifest['input_size']}"),
        ("normalisation", f"mean {human(norm['mean'])} std {human(norm['std'])}"),
        (
            "networks",
            "\n".join(
                f"{a}  threshold {score(thresholds[a])}  temperature {human(temperatures[a])}"
                for a in bundle.architectures
            ),
        ),
        ("ensemble", f"{bundle.ensemble_policy}, threshold {score(bundle.ensemble_threshold)}"),
    ]
    for title, values in (("provenance", bundle.provenance), ("metrics", bundle.metrics)):
        text = "\n".join(f"{k}: {human(v)}" for k, v in values.items())
        rows.append((title, text or "-"))
    int8 = (manifest.get("int8") or {}).get("networks") or {}
    if int8:
        rows.append(
            (
                "int8",
                "\n".join(
                    f"{a}  drift {human(d['max_abs_diff'])}  AUC {score(d['auc_fp32']) or 'n/a'} -> "
                    f"{score(d['auc_int8']) or 'n/a'}"
                    for a, d in int8.items()
                ),
            )
        )
    files = manifest["files"].items()
    listed = (f"{n}  {human(e['size'] / 1e6, 1)} MB  sha256 {e['sha256'][:16]}…" for n, e in files)
    rows.append(("files", "\n".join(listed)))
    return rows
