"""Commands for the PACS: ``publish`` (DICOM SR reports by STOW-RS) and ``results --format dicom-sr``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from cli.render import console, fail
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from db.queries import JobProgress
    from pacs.publish import PublishSummary


def _open(job: int, *, write: bool = False) -> tuple[Engine, JobProgress]:
    """The results database and the job (a UserError says what is wrong with either)."""
    from db.schema import open_database  # SQLAlchemy and Alembic: kept out of CLI start-up
    from producer.requeue import find_job

    engine = open_database(write=write)
    return engine, find_job(engine, job, stall_after=get_settings().effective_stall_after)


def publish_command(
    job: int = typer.Argument(..., help="Job id."),
    to: Optional[str] = typer.Option(
        None,
        "--to",
        help="The PACS service root (dicomweb://host:port/path; dicomwebs:// for HTTPS). Default: "
        "DEEPCOVID_PUBLISH_TO, else the PACS the job was screened from.",
    ),
    again: bool = typer.Option(False, "--again", help="Send the reports already published there as well."),
) -> None:
    """Send one DICOM SR report per scored image of JOB to a PACS by STOW-RS, into each source's study.

    The reports' UIDs come from (image, bundle), so running it again never duplicates; by default only
    reports not yet published there (new, or failed before) are sent. Exit 1 if any failed."""
    from pacs.publish import publish_job  # highdicom and SQLAlchemy: kept out of CLI start-up

    engine, progress = _open(job, write=True)
    settings = _reading_the_job_pacs(progress.source)
    destination = to or settings.publish_to or _source_pacs(progress.source)
    if not destination:
        raise fail(
            f"job {job} was not screened from a PACS: say where to send its reports with --to "
            "dicomweb://host:port/path",
            ExitCode.USAGE,
        )
    summary = publish_job(engine, job, destination, settings, again=again)
    _report(summary, f"published to {summary.destination}")
    if summary.failed:
        raise typer.Exit(int(ExitCode.FAILURES))


def write_reports_command(job: int, out: Path | None) -> None:
    """``results JOB --format dicom-sr --out DIR``: the reports as files."""
    from pacs.publish import write_reports  # highdicom and SQLAlchemy: kept out of CLI start-up

    if out is None:
        raise fail("--format dicom-sr writes one file per report: give the folder with --out", ExitCode.USAGE)
    engine, progress = _open(job)
    summary = write_reports(engine, job, out, _reading_the_job_pacs(progress.source))
    _report(summary, f"written to {out}")
    if summary.failed:
        raise typer.Exit(int(ExitCode.FAILURES))


def _reading_the_job_pacs(source: str) -> Settings:
    """The settings, with the job's own PACS (named by whoever ran it) allowed: its headers are read."""
    settings = get_settings()
    pacs = _source_pacs(source)
    if not pacs:
        return settings
    return settings.model_copy(update={"dicomweb_allow": [*settings.dicomweb_allow, pacs]})


def _source_pacs(source: str) -> str:
    from deepcovid.dicomweb import is_dicomweb

    return source.partition("?")[0] if is_dicomweb(source) else ""


def _report(summary: PublishSummary, where: str) -> None:
    line = f"{summary.published:,} reports {where}"
    if summary.already:
        line += f"; {summary.already:,} were already there"
    if summary.skipped:
        line += f"; {summary.skipped:,} images are not DICOM (no report)"
    if summary.failed:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary.reasons.items()))
        line += f"; {summary.failed:,} failed ({reasons})"
    console.print(line, highlight=False)
