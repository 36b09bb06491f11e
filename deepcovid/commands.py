"""Core commands: ``inspect`` and ``bundle init`` / ``bundle show``."""

from __future__ import annotations

import typer


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Attach the core commands to the CLI (called by deepcovid.cli)."""
    register_inspect(app)
    register_bundle_commands(groups["bundle"])


def register_inspect(app: typer.Typer) -> None:
    """`deepcovid inspect PATH...` (owned by the decoding work)."""
    # Annotations stay builtins (str, list[str]) because typer resolves them in this module's globals.

    @app.command("inspect")
    def inspect(
        paths: list[str] = typer.Argument(..., help="Image files or directories (walked recursively)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only failures and the summary."),
    ) -> None:
        """Decode images and report size, bit depth and format, or why each one fails.

        Directories are walked recursively in sorted order, trying image suffixes
        (.png, .jpg, .dcm, ...) and files without a suffix; other files are skipped.
        Exit code 0 when every image decodes, 1 when some fail, 2 for a missing path.
        Patient data is never printed.
        """
        from collections import Counter
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        from rich.console import Console
        from rich.markup import escape

        from deepcovid.decode import decode_path
        from deepcovid.errors import ImageError
        from deepcovid.formats import IMAGE_SUFFIXES
        from deepcovid.settings import get_settings

        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise typer.BadParameter(f"no such file or directory: {', '.join(missing)}", param_hint="PATHS")

        files: list[Path] = []
        skipped = 0
        for given in map(Path, paths):
            if not given.is_dir():
                files.append(given)
                continue
            for found in sorted(given.rglob("*")):
                relative = found.relative_to(given).parts
                if any(part.startswith(".") for part in relative) or not found.is_file():
                    continue
                if found.suffix.lower() in IMAGE_SUFFIXES or not found.suffix:
                    files.append(found)
                else:
                    skipped += 1
        files = list(dict.fromkeys(files))

        settings = get_settings()

        def describe(path: Path) -> tuple[str, str]:
            try:
                info = decode_path(path, max_pixels=settings.max_image_pixels).info
            except ImageError as exc:
                return exc.reason, exc.detail
            except Exception as exc:  # a bug, not the file: report it against this file and go on
                return "internal_error", f"{type(exc).__name__}: {exc}"
            text = f"{info.format} {info.width}x{info.height} {info.bit_depth}-bit {info.mode}"
            if info.dicom:
                text += "".join(f" {info.dicom[k]}" for k in ("Modality", "ViewPosition") if k in info.dicom)
            return "ok", text

        console = Console(highlight=False, soft_wrap=True)
        failures: Counter[str] = Counter()
        ok = 0
        with ThreadPoolExecutor(max_workers=max(1, settings.decode_threads)) as pool:
            for path, (status, text) in zip(files, pool.map(describe, files), strict=True):
                if status == "ok":
                    ok += 1
                    if not quiet:
                        console.print(f"[green]ok[/]      {escape(str(path))}  {escape(text)}")
                else:
                    failures[status] += 1
                    console.print(f"[bold red]FAILED[/]  {escape(str(path))}  {status}: {escape(text)}")

        summary = f"ok {ok}, failed {sum(failures.values())}"
        if failures:
            summary += " (" + ", ".join(f"{r} {n}" for r, n in sorted(failures.items())) + ")"
        if skipped:
            summary += f", skipped {skipped} non-image file{'s' if skipped != 1 else ''}"
        if not files:
            summary += " - no image files found"
        console.print(summary)
        if failures:
            raise typer.Exit(code=1)


def register_bundle_commands(bundle_app: typer.Typer) -> None:
    """`deepcovid bundle init` and `deepcovid bundle show` (owned by the bundle work)."""
    # Annotations stay builtins (str, list[str]) because typer resolves them in this module's globals.

    def fail(message: str) -> typer.Exit:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        return typer.Exit(code=1)

    @bundle_app.command("init")
    def bundle_init(
        out: str = typer.Argument(..., help="New (or empty) directory to write the bundle to."),
        pretrained: str = typer.Option(
            ...,
            "--pretrained",
            help="Initial weights: none (random), imagenet (torch hub cache or "
            "DEEPCOVID_IMAGENET_WEIGHTS_DIR), or a directory holding torchvision's ImageNet checkpoint "
            "files (a file with one --arch).",
        ),
        arch: list[str] = typer.Option(
            [], "--arch", help="Network to include (repeatable); default: all four."
        ),
        policy: str = typer.Option("mean", "--policy", help="Ensemble policy: mean, majority or any."),
        ensemble_threshold: float = typer.Option(0.5, "--ensemble-threshold", help="Ensemble threshold."),
        seed: int = typer.Option(0, "--seed", help="Random seed for the freshly initialised heads."),
    ) -> None:
        """Write an untrained bundle (random or ImageNet backbones, new 2-class heads): tests, first runs."""
        from pathlib import Path

        import torch
        from rich.console import Console

        from deepcovid.bundle import BundleError, save_bundle
        from deepcovid.networks import (
            ARCHITECTURES,
            PretrainedWeightsUnavailable,
            build_network,
            locate_weights,
        )

        architectures = list(dict.fromkeys(arch)) or list(ARCHITECTURES)
        unknown = [a for a in architectures if a not in ARCHITECTURES]
        if unknown:
            raise fail(
                f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}"
            )
        if pretrained in ("none", "imagenet"):
            source: str | Path = pretrained
        else:
            source = Path(pretrained).expanduser()
            if not source.exists():
                raise fail(f"--pretrained {pretrained}: no such file or directory (or use none / imagenet)")
            if source.is_file() and len(architectures) != 1:
                raise fail(
                    "--pretrained FILE needs exactly one --arch; pass a directory for several networks"
                )
        if source != "none":  # report every missing checkpoint at once, before building anything
            missing = []
            for a in architectures:
                try:
                    locate_weights(a, source)
                except PretrainedWeightsUnavailable as exc:
                    missing.append(str(exc))
            if missing:
                raise fail("\n\n".join(missing))
        torch.manual_seed(seed)
        try:
            networks = {a: build_network(a, source) for a in architectures}
            bundle = save_bundle(
                Path(out),
                networks,
                ensemble_policy=policy,
                ensemble_threshold=ensemble_threshold,
                provenance={
                    "kind": "untrained",
                    "pretrained": str(source),
                    "seed": seed,
                    "note": "heads are randomly initialised; not fit for screening",
                },
            )
        except (PretrainedWeightsUnavailable, BundleError) as exc:
            raise fail(str(exc)) from None
        Console().print(f"wrote untrained bundle [bold]{bundle.bundle_id}[/] to {bundle.path}")

    @bundle_app.command("show")
    def bundle_show(
        path: str = typer.Argument(..., help="Bundle directory, or the id of an installed bundle."),
        json_output: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    ) -> None:
        """Verify a bundle (every file hash and its id) and print its manifest."""
        import json
        from pathlib import Path

        from rich.console import Console
        from rich.table import Table

        from deepcovid.bundle import BundleError, find_bundle, load_bundle
        from deepcovid.settings import get_settings

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
        manifest = bundle.manifest
        console = Console()
        table = Table(title=f"Bundle {bundle.bundle_id} (verified)", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("path", str(bundle.path))
        table.add_row("format", str(manifest["format_version"]))
        table.add_row("created", str(bundle.created_at))
        table.add_row("classes", ", ".join(bundle.classes))
        table.add_row("input", f"{manifest['input_size']}x{manifest['input_size']}")
        norm = manifest["normalization"]
        table.add_row("normalisation", f"mean {norm['mean']} std {norm['std']}")
        table.add_row(
            "networks",
            "\n".join(f"{a}  threshold {bundle.thresholds[a]:g}" for a in bundle.architectures),
        )
        table.add_row("ensemble", f"{bundle.ensemble_policy}, threshold {bundle.ensemble_threshold:g}")
        for title, values in (("provenance", bundle.provenance), ("metrics", bundle.metrics)):
            text = "\n".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items())
            table.add_row(title, text or "-")
        table.add_row(
            "files",
            "\n".join(
                f"{name}  {entry['size'] / 1e6:.1f} MB  sha256 {entry['sha256'][:16]}…"
                for name, entry in manifest["files"].items()
            ),
        )
        console.print(table)
