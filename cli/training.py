"""Training commands: train, evaluate, bundle register, bundle promote, bundle quantize, demo-data.

Thin over ``training``: each command parses options, calls one domain function and prints what it returns.
Training modules load torch, so they are imported inside the commands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.logging import RichHandler

from cli.render import err_console, fail, group_table, human, probe_table, rows_table, score, show, warning
from deepcovid import defaults
from deepcovid.bundle import Bundle, BundleError, load_bundle
from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode
from deepcovid.networks import PretrainedWeightsUnavailable
from deepcovid.settings import get_settings
from deepcovid.untrained import is_untrained, untrained_warning
from training.args import RECIPES, TrainArgs
from training.synthetic import write_demo_archive, write_labelled_folder

ALLOW_UNTRAINED = typer.Option(
    "--allow-untrained",
    help="No warning when promoting an untrained bundle (from `bundle init`, for pipeline checks).",
)


def _setup_logging() -> None:
    """Training logs its progress (epochs, AUCs) at INFO: show it on standard error unless already set up."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=get_settings().log_level,
            format="%(message)s",
            handlers=[RichHandler(console=err_console, show_path=False)],
        )


def _from_recipe(name: str, what: str = "") -> str:
    """Help text naming the field's value in each recipe."""
    values = ", ".join(f"{recipe} {getattr(RECIPES[recipe], name)}" for recipe in RECIPES)
    return f"{what + '. ' if what else ''}Default from the recipe: {values}."


def train_command(
    data: Annotated[
        Path, typer.Argument(help="Labelled folder (covid/, non_covid/) or CSV (path,label[,patient_id]).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create (must not exist).")],
    test: Annotated[
        Optional[Path], typer.Option(help="Separate labelled test data, evaluated at the end.")
    ] = TrainArgs.test,
    archs: Annotated[
        Optional[list[str]],
        typer.Option("--arch", help="Train only this network (repeatable). Default: all four."),
    ] = None,
    pretrained: Annotated[str, typer.Option(help="imagenet, none, or a weights file/directory.")] = (
        TrainArgs.pretrained
    ),
    finetune: Annotated[
        Optional[str],
        typer.Option(
            help="head: only the last layer (default with weights); all: every layer (from scratch)."
        ),
    ] = TrainArgs.finetune,
    recipe: Annotated[
        Optional[str],
        typer.Option(help="paper (default with weights) or scratch (default with --pretrained none)."),
    ] = TrainArgs.recipe,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=_from_recipe("epochs"))] = TrainArgs.epochs,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help=_from_recipe("batch_size"))] = (
        TrainArgs.batch_size
    ),
    lr: Annotated[
        Optional[float], typer.Option(help=_from_recipe("lr", "Peak learning rate"))
    ] = TrainArgs.lr,
    optimizer: Annotated[Optional[str], typer.Option(help=_from_recipe("optimizer", "adam or adamw"))] = (
        TrainArgs.optimizer
    ),
    weight_decay: Annotated[Optional[float], typer.Option(min=0, help=_from_recipe("weight_decay"))] = (
        TrainArgs.weight_decay
    ),
    label_smoothing: Annotated[
        Optional[float], typer.Option(min=0, max=0.5, help=_from_recipe("label_smoothing"))
    ] = TrainArgs.label_smoothing,
    warmup_epochs: Annotated[
        Optional[int], typer.Option(min=0, help=_from_recipe("warmup_epochs", "Linear warm-up epochs"))
    ] = TrainArgs.warmup_epochs,
    schedule: Annotated[
        Optional[str], typer.Option(help=_from_recipe("schedule", "After warm-up: constant or cosine"))
    ] = TrainArgs.schedule,
    augment: Annotated[
        Optional[str], typer.Option(help=_from_recipe("augment", "paper (mild) or cxr (stronger)"))
    ] = TrainArgs.augment,
    ema: Annotated[
        Optional[float],
        typer.Option(
            metavar="DECAY", help=_from_recipe("ema", "Keep an EMA of the weights (e.g. 0.999); 0: off")
        ),
    ] = TrainArgs.ema,
    seed: int = TrainArgs.seed,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = TrainArgs.device,
    val_fraction: Annotated[
        float, typer.Option(help="Share of the data (by patient) held out for validation.")
    ] = TrainArgs.val_fraction,
    test_fraction: Annotated[
        float, typer.Option(help="Share held out (by patient) as a test set and evaluated at the end.")
    ] = TrainArgs.test_fraction,
    target_sensitivity: Annotated[
        float, typer.Option(help="Thresholds: the highest that reaches this sensitivity on validation.")
    ] = TrainArgs.target_sensitivity,
    early_stopping: Annotated[
        Optional[int],
        typer.Option(
            metavar="PATIENCE",
            help=_from_recipe(
                "early_stopping", "Stop after this many epochs without a better val AUC; 0: never"
            ),
        ),
    ] = TrainArgs.early_stopping,
    resume: Annotated[
        bool, typer.Option(help="Continue from the checkpoints in --checkpoint-dir.")
    ] = TrainArgs.resume,
    checkpoint_dir: Annotated[
        Optional[Path], typer.Option(help="Default: OUT.ckpt beside the bundle.")
    ] = TrainArgs.checkpoint_dir,
    report_dir: Annotated[
        Optional[Path], typer.Option(help="Test report folder. Default: OUT.report.")
    ] = TrainArgs.report_dir,
    workers: Annotated[
        Optional[int],
        typer.Option(min=0, max=8, help="DataLoader worker processes. Default: 0 on CPU, 8 on CUDA."),
    ] = TrainArgs.workers,
    precision: Annotated[
        str,
        typer.Option(
            help="auto: bf16 autocast on CPUs with bf16 instructions while validation AUC agrees with fp32, "
            "fp16 AMP on CUDA; fp32; bf16."
        ),
    ] = TrainArgs.precision,
    cache: Annotated[
        bool, typer.Option(help="Decode each image once into the training cache (under the data dir).")
    ] = TrainArgs.cache,
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="Training cache folder. Default: DATA_DIR/cache/train.")
    ] = TrainArgs.cache_dir,
    test_where: Annotated[
        Optional[str],
        typer.Option(
            metavar="COLUMN=VALUE",
            help="Hold out the CSV rows whose COLUMN is VALUE (a whole source or view) as the test set.",
        ),
    ] = TrainArgs.test_where,
    hflip: Annotated[
        bool, typer.Option(help="Also flip COVID images horizontally when augmenting (the paper did).")
    ] = TrainArgs.hflip,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = TrainArgs.progress,
    bf16_check_images: Annotated[
        int,
        typer.Option(
            min=0, help="Validation images scored in bf16 and fp32; CPU workers use bf16 only if they agree."
        ),
    ] = TrainArgs.bf16_check_images,
    int8_calibration_images: Annotated[
        int,
        typer.Option(
            min=0,
            help="Training images calibrating int8 networks for CPU workers (needs deepcovid[openvino]); "
            "0: none.",
        ),
    ] = TrainArgs.int8_calibration_images,
) -> None:
    """Fine-tune the networks on labelled X-rays; write a bundle with thresholds chosen on validation data."""
    options = dict(locals())  # every parameter is the TrainArgs field of the same name
    # torch: kept out of CLI start-up
    from deepcovid.precision import validated_bf16_drift
    from training.checkpoint import ResumeError
    from training.train import main

    _setup_logging()
    try:
        args = TrainArgs(**options)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} already exists; choose a new --out")
        bundle = main(args)
    except (PretrainedWeightsUnavailable, ResumeError, BundleError, ValueError) as exc:
        raise fail(str(exc)) from None
    err_console.print(f"bundle [bold]{bundle.bundle_id}[/] written to {bundle.path}", highlight=False)
    validation = bundle.metrics.get("validation", {})
    for name, auc in (validation.get("auc") or {}).items():
        err_console.print(f"  validation AUC {name}: {score(auc) or 'n/a'}", highlight=False)
    for arch, precision in (bundle.provenance.get("training_precision") or {}).items():
        gaps = [h["bf16_auc_gap"] for h in bundle.provenance["history"][arch] if "bf16_auc_gap" in h]
        checked = f" (bf16 - fp32 validation AUC up to {human(max(gaps))})" if gaps else ""
        err_console.print(f"  trained {arch} in {precision}{checked}", highlight=False)
    if (worst := validated_bf16_drift(bundle)) is not None:
        tolerance = get_settings().bf16_tolerance
        verdict = (
            "CPU workers with bf16 instructions use bf16" if worst <= tolerance else "workers stay in fp32"
        )
        err_console.print(
            f"  bf16 vs fp32 on validation: up to {human(worst)} (tolerance {human(tolerance)}): {verdict}"
        )
    _print_int8(bundle)


def _print_int8(bundle: Bundle) -> None:
    """The int8 drift the bundle records, per network, and whether CPU workers will use int8."""
    from deepcovid.precision import int8_refusal  # torch: kept out of CLI start-up

    networks = (bundle.manifest.get("int8") or {}).get("networks") or {}
    for arch, drift in networks.items():
        err_console.print(
            f"  int8 vs fp32 on validation, {arch}: up to {human(drift['max_abs_diff'])}, AUC "
            f"{score(drift['auc_fp32']) or 'n/a'} -> {score(drift['auc_int8']) or 'n/a'}",
            highlight=False,
        )
    if networks:
        import torch

        refusal = int8_refusal(torch.device("cpu"), "auto", get_settings(), bundle)
        verdict = "CPU workers use int8" if refusal is None else f"CPU workers do not use int8: {refusal}"
        err_console.print(f"  {verdict}", highlight=False)


def quantize_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to add int8 networks to.")],
    calibration: Annotated[
        Path,
        typer.Option(
            help="Labelled X-rays (CSV or class folders), split as the bundle's training split them: "
            "training images calibrate, validation images measure the drift."
        ),
    ],
    out: Annotated[
        Optional[Path], typer.Option(help="New bundle directory; default: BUNDLE-int8 beside it.")
    ] = None,
    calibration_images: Annotated[
        int, typer.Option(min=1, help="Training images calibrating the int8 activation ranges.")
    ] = defaults.INT8_CALIBRATION_IMAGES,
    val_fraction: Annotated[
        Optional[float], typer.Option(help="Validation share; default: the bundle's training run's.")
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="Split seed; default: the bundle's training run's.")
    ] = None,
) -> None:
    """Write a copy of a bundle with int8 networks for CPU workers and their measured drift (a new id)."""
    # torch, OpenVINO: kept out of CLI start-up
    from deepcovid.int8 import engine_missing
    from training.quantize import quantize_bundle

    _setup_logging()
    target = out or bundle.parent / f"{bundle.name}-int8"
    if (missing := engine_missing()) is not None:
        raise fail(missing)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise fail(f"{target} already exists; choose a new --out")
    try:
        made = quantize_bundle(
            bundle,
            calibration,
            target,
            calibration_images=calibration_images,
            val_fraction=val_fraction,
            seed=seed,
        )
    except (BundleError, ValueError) as exc:  # training.data.DataError is a ValueError
        raise fail(str(exc)) from None
    err_console.print(
        f"bundle [bold]{made.bundle_id}[/] with int8 networks written to {made.path}", highlight=False
    )
    _print_int8(made)


def evaluate_command(
    bundle: Annotated[Optional[Path], typer.Argument(help="Bundle directory.")] = None,
    test_data: Annotated[
        Optional[Path], typer.Argument(help="Labelled folder or CSV to evaluate on.")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Report folder (report.md, metrics.json, PNGs).")
    ] = None,
    reviews: Annotated[
        Optional[int],
        typer.Option(
            "--reviews", help="Instead: job JOB's PPV and sensitivity against the reviewers' verdicts."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = defaults.EVAL_BATCH_SIZE,
    bootstrap: Annotated[
        int, typer.Option(min=100, help="Bootstrap resamples for the AUC interval.")
    ] = defaults.BOOTSTRAP_RESAMPLES,
    db: Annotated[
        bool, typer.Option("--db/--no-db", help="Record the metrics in the bundle registry.")
    ] = True,
    by: Annotated[
        Optional[str],
        typer.Option(
            metavar="COLUMN",
            help="Also per value of this labels.csv column (source_repo, view, finding, ...): "
            "sensitivity, specificity and AUC with 95% intervals.",
        ),
    ] = None,
    probe: Annotated[
        bool,
        typer.Option(help="With --by: the shortcut probe (can COLUMN be read off the networks' features?)."),
    ] = True,
) -> None:
    """Evaluate a bundle on labelled test data with the screener's own scoring; write a report.

    With --reviews JOB: the screener's PPV on job JOB's reviewed images, and its sensitivity where
    reviewed images it did not flag allow one, against the review workbench's settled verdicts.
    """
    if reviews is not None:
        from cli.review import print_reviewed_metrics

        print_reviewed_metrics(reviews)
        return
    if bundle is None or test_data is None or out is None:
        raise fail("give BUNDLE, TEST_DATA and --out (or --reviews JOB)", ExitCode.USAGE)
    from training.evaluate import evaluate_bundle  # torch: kept out of CLI start-up

    _setup_logging()
    try:
        metrics = evaluate_bundle(
            bundle,
            test_data,
            out,
            device=device,
            batch_size=batch_size,
            record_db=db,
            n_resamples=bootstrap,
            by=by,
            probe=probe,
        )
    except (BundleError, ValueError) as exc:  # training.data.DataError is a ValueError
        raise fail(str(exc)) from None
    op = metrics["operating"]
    err_console.print(
        f"ensemble @ {score(op['threshold'])}: sensitivity {score(op['sensitivity']) or 'n/a'}, "
        f"specificity {score(op['specificity']) or 'n/a'}, "
        f"AUC {score(op['auc']) or 'n/a'}; report in {out}",
        highlight=False,
    )
    if "by" in metrics:
        show(group_table(metrics["by"]))
        if "probe" in metrics["by"]:
            show(probe_table(metrics["by"]["probe"]))


def register_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to verify, install and register.")],
    promote: Annotated[
        bool, typer.Option(help="Also make it the active bundle (subject to the promotion gate).")
    ] = False,
    force: Annotated[bool, typer.Option(help="With --promote: skip the promotion gate.")] = False,
    allow_untrained: Annotated[bool, ALLOW_UNTRAINED] = False,
) -> None:
    """Verify a bundle, copy it into the bundles directory and record it in the database.

    Registering never changes the active bundle (not even the first one); use --promote or `bundle promote`.
    On the embedded SQLite default, the database is created on first use, as `screen` does.
    """
    # torch: kept out of CLI start-up
    from training.registry import PromotionRefused, promote_bundle, register

    settings = get_settings()
    try:
        loaded = load_bundle(bundle)
        from db.schema import open_database  # SQLAlchemy and Alembic: kept out of CLI start-up

        engine = open_database(settings, create=True)
        installed = register(engine, loaded, settings=settings)
        err_console.print(
            f"registered bundle [bold]{loaded.bundle_id}[/] (installed at {installed})", highlight=False
        )
        if promote:
            promoted = promote_bundle(engine, loaded.bundle_id, force=force)
            if is_untrained(loaded.manifest) and not allow_untrained:
                warning(untrained_warning(loaded.bundle_id))
            err_console.print(promoted, highlight=False)
    except (BundleError, PromotionRefused, LookupError) as exc:
        raise fail(str(exc)) from None
    except UserError as exc:
        raise _registry_error(exc) from None


def promote_command(
    bundle_id: Annotated[str, typer.Argument(help="Id of a registered bundle.")],
    force: Annotated[bool, typer.Option(help="Promote even if the gate refuses.")] = False,
    allow_untrained: Annotated[bool, ALLOW_UNTRAINED] = False,
) -> None:
    """Make a registered bundle the active one for new jobs, if it is not less sensitive than the current one.

    The gate compares ensemble sensitivity at the operating threshold on the same evaluation data (same
    eval_data_id); without such a pair of evaluations it refuses unless --force.
    """
    # torch, SQLAlchemy: kept out of CLI start-up
    from db.registry import get_bundle
    from db.schema import open_database
    from training.registry import PromotionRefused, promote_bundle

    try:
        engine = open_database(get_settings(), create=True)
        promoted = promote_bundle(engine, bundle_id, force=force)
        if is_untrained(get_bundle(engine, bundle_id).manifest) and not allow_untrained:
            warning(untrained_warning(bundle_id))
        err_console.print(promoted, highlight=False)
    except (PromotionRefused, LookupError) as exc:
        raise fail(str(exc)) from None
    except UserError as exc:
        raise _registry_error(exc) from None


def _registry_error(exc: UserError) -> typer.Exit:
    """The registry commands exit 1 on database problems, as they always have; a data dir they cannot
    write keeps its own code, as in every command that writes."""
    if exc.exit_code is ExitCode.DATA_DIR_NOT_WRITABLE:
        return fail(exc.message, exc.exit_code)
    return fail(exc.message)


def list_command() -> None:
    """List the registered bundles, oldest first: which is active, how each was made and evaluated."""
    from db.registry import list_bundles  # SQLAlchemy: kept out of CLI start-up
    from db.schema import open_database

    rows = []
    for record in list_bundles(open_database(get_settings())):
        provenance = (record.manifest or {}).get("provenance", {})
        evaluation = (record.metrics or {}).get("operating", {})
        sensitivity = evaluation.get("sensitivity")
        rows.append(
            (
                record.bundle_id,
                "active" if record.active else "",
                str(provenance.get("kind", "trained")),
                f"{record.registered_at:%Y-%m-%d %H:%M}",
                "" if sensitivity is None else f"sensitivity {human(sensitivity)}",
                record.path,
            )
        )
    if not rows:
        err_console.print("no bundle is registered: `deepcovid bundle register BUNDLE_DIR --promote`")
        return
    show(rows_table("Registered bundles", ("bundle", "", "kind", "registered", "evaluation", "path"), rows))


def demo_data_command(
    out: Annotated[Path, typer.Argument(help="Folder to create: OUT/train (labelled) and OUT/archive.")],
    images: Annotated[
        int, typer.Option(min=4, help="Images per class for training; the archive gets as many.")
    ] = 60,
    size: Annotated[int, typer.Option(min=32, help="Side of the generated images in pixels.")] = 128,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Generate a synthetic labelled training set and an unlabelled archive (for demos; no patient data)."""
    write_labelled_folder(out / "train", images, images, size=size, seed=seed)
    write_demo_archive(out / "archive", images, size=size * 2, seed=seed + 1)
    err_console.print(
        f"wrote {2 * images} labelled images to {out / 'train'} and {images} images "
        f"(+2 deliberately broken files) to {out / 'archive'}",
        highlight=False,
    )
