"""``deepcovid serve``, ``users`` and ``reviews``: the review workbench, its accounts, and its verdicts
carried back into training and evaluation. Thin: the work is in the ``review`` package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cli.render import check_output, console, err_console, fail, rows_table, score, show
from deepcovid import defaults
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import get_settings
from deepcovid.status import Role

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


def _engine(create: bool = False) -> Engine:
    """The results database; ``create``: the embedded SQLite default is made on first use, as `screen`
    makes it, so `users add` and `serve` work on a fresh box."""
    from db.schema import open_database  # SQLAlchemy and Alembic: kept out of CLI start-up

    return open_database(get_settings(), create=create)


def serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on; behind a TLS proxy keep 127.0.0.1.")] = (
        defaults.REVIEW_HOST
    ),
    port: Annotated[int, typer.Option(min=1, max=65535)] = defaults.REVIEW_PORT,
) -> None:
    """Run the review workbench web app (sign in at /login; add accounts with `deepcovid users add`)."""
    import uvicorn  # the web stack: only for this command

    from review.app import create_app

    settings = get_settings()
    app = create_app(settings, _engine(create=True))
    err_console.print(f"review workbench on http://{host}:{port}/ (Ctrl-C stops it)", highlight=False)
    # X-Forwarded-Proto is read by the app itself, and only when DEEPCOVID_TRUST_FORWARDED_PROTO is set.
    uvicorn.run(app, host=host, port=port, proxy_headers=False, server_header=False, log_level="warning")


def users_add_command(
    name: Annotated[str, typer.Argument(help="User name (letters, digits and . _ @ -).")],
    role: Annotated[Role, typer.Option(help="reviewer: review; admin: also manage users and adjudicate.")] = (
        Role.reviewer
    ),
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Add a workbench account; the password is asked for (twice), or read from standard input."""
    from review.accounts import add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    account = add_user(_engine(create=True), name, password, role)
    err_console.print(f"added {account.role.value} [bold]{account.name}[/]", highlight=False)


def users_list_command() -> None:
    """List workbench accounts."""
    from review.accounts import list_users

    rows = [
        (
            u.name,
            u.role.value,
            "disabled" if u.disabled else "active",
            u.created_at.strftime("%Y-%m-%d %H:%M") if u.created_at else "",
        )  # fmt: skip
        for u in list_users(_engine())
    ]
    show(rows_table(None, ("name", "role", "state", "created"), rows))


def users_disable_command(name: Annotated[str, typer.Argument(help="User name.")]) -> None:
    """Disable an account: it cannot sign in, and its open sessions end at once."""
    from review.accounts import disable_user

    disable_user(_engine(create=True), name)
    err_console.print(f"disabled [bold]{name}[/]", highlight=False)


def reviews_export_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Labels CSV to write (path,label,patient_id,verdict).")
    ],
    job: Annotated[Optional[int], typer.Option(help="Only images of this job.")] = None,
) -> None:
    """Write the reviewers' settled verdicts as a labels file `deepcovid train` and `evaluate` read.

    COVID-19 becomes covid and Not COVID-19 non_covid; Indeterminate, Not a chest X-ray and disputed images
    are left out (and counted). patient_id is the DICOM study UID where known.
    """
    from review.outcomes import export_labels

    check_output(out)
    done = export_labels(_engine(), out, job_id=job)
    left = ", ".join(f"{why} {n}" for why, n in sorted(done.left_out.items()))
    err_console.print(
        f"wrote {done.written} labels to {out}" + (f"; left out: {left}" if left else ""), highlight=False
    )
    if not done.written:
        raise fail("no settled COVID-19 / Not COVID-19 verdicts to export", ExitCode.FAILURES)


def print_reviewed_metrics(job: int) -> None:
    """``deepcovid evaluate --reviews JOB``: the screener's PPV and sensitivity against the reviewers."""
    from db.queries import UnknownJob, job_progress
    from review.outcomes import reviewed_metrics

    engine = _engine()
    try:
        job_progress(engine, job)
    except UnknownJob as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    metrics = reviewed_metrics(engine, job_id=job)
    if not metrics:
        raise fail(f"job {job} has no image with a settled COVID-19 / Not COVID-19 review yet")
    rows = [
        (
            m.bundle_id[:16],
            str(m.reviewed),
            str(m.flagged),
            str(m.true_positive),
            str(m.false_positive),
            str(m.false_negative),
            str(m.true_negative),
            score(m.ppv) or "n/a",
            score(m.sensitivity) or f"n/a ({m.sensitivity_note})",
        )  # fmt: skip
        for m in metrics
    ]
    columns = ("bundle", "reviewed", "flagged", "TP", "FP", "FN", "TN", "PPV", "sensitivity")
    show(rows_table(f"job {job} against the reviewers", columns, rows, right=columns[1:8]), console)
