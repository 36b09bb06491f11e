"""The ``deepcovid`` command: every sub-command, composed here with plain imports (rq's ``cli/cli.py``).

Each command is wrapped in ``guarded``, so a UserError from any domain function ends it with one line
and its exit code.
"""

from __future__ import annotations

import sys
from importlib.metadata import version as package_version

import typer

from cli import core, db, explain, jobs, pacs, review, scan, training, worker
from cli.render import error, guarded, warning
from deepcovid.exitcodes import ExitCode, help_text
from deepcovid.settings import unknown_variables

app = typer.Typer(
    help="Deep-COVID Screen: screen chest X-ray archives for COVID-19 with a four-CNN ensemble.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bundle_app = typer.Typer(help="Create, inspect, register and promote model bundles.", no_args_is_help=True)
db_app = typer.Typer(help="Results database: migrations and checks.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(db_app, name="db")

SCAN_HELP = "\n\n" + help_text(scan.EXIT_CODES)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deepcovid-screen {package_version('deepcovid-screen')}")
        raise typer.Exit()


@app.callback()
@guarded
def startup(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Warn of DEEPCOVID_* variables no setting reads, naming the closest one. (Every command reads the
    settings before it does any work; a bad value there is one line and exit 4, and ``--help`` never
    reads them.)"""
    for name, closest in unknown_variables():
        hint = f"; did you mean {closest}?" if closest else ""
        warning(f"{name} is not a deepcovid setting and is ignored{hint}")


app.command("config")(guarded(core.config_command))
app.command("inspect")(guarded(core.inspect_command))
app.command("enqueue", help=scan.enqueue_command.__doc__ + SCAN_HELP)(guarded(scan.enqueue_command))
app.command("screen", help=scan.screen_command.__doc__ + SCAN_HELP)(guarded(scan.screen_command))
app.command("status")(guarded(jobs.status_command))
app.command("results")(guarded(jobs.results_command))
app.command("publish")(guarded(pacs.publish_command))
jobs_app = typer.Typer(help=jobs.jobs_command.__doc__, invoke_without_command=True)
jobs_app.callback()(guarded(jobs.jobs_command))
jobs_app.command("close")(guarded(jobs.close_command))
jobs_app.command("prune")(guarded(jobs.prune_command))
app.add_typer(jobs_app, name="jobs")
app.command("requeue")(guarded(jobs.requeue_command))
app.command("audit")(guarded(jobs.audit_command))
app.command("demo-data")(guarded(training.demo_data_command))
app.command("train")(guarded(training.train_command))
app.command("evaluate")(guarded(training.evaluate_command))
app.command("explain")(guarded(explain.explain_command))
app.command("worker")(guarded(worker.worker_command))
app.command("serve")(guarded(review.serve_command))
users_app = typer.Typer(help="Review workbench accounts.", no_args_is_help=True)
users_app.command("add")(guarded(review.users_add_command))
users_app.command("list")(guarded(review.users_list_command))
users_app.command("disable")(guarded(review.users_disable_command))
app.add_typer(users_app, name="users")
reviews_app = typer.Typer(help="Reviewers' verdicts: export them as labels.", no_args_is_help=True)
reviews_app.command("export")(guarded(review.reviews_export_command))
app.add_typer(reviews_app, name="reviews")

bundle_app.command("init")(guarded(core.bundle_init_command))
bundle_app.command("show")(guarded(core.bundle_show_command))
bundle_app.command("register")(guarded(training.register_command))
bundle_app.command("promote")(guarded(training.promote_command))
bundle_app.command("list")(guarded(training.list_command))
bundle_app.command("quantize")(guarded(training.quantize_command))

db_app.command("upgrade")(guarded(db.upgrade_command))
db_app.command("downgrade")(guarded(db.downgrade_command))
db_app.command("current")(guarded(db.current_command))


def main() -> None:
    """Console entry point: a database that stops answering mid-command is one line and exit 15."""
    try:
        app()
    except Exception as exc:
        if not _database_error(exc):
            raise
        error(str(exc))
        raise SystemExit(int(ExitCode.DATABASE_UNREACHABLE)) from None


def _database_error(exc: Exception) -> bool:
    """An SQLAlchemy OperationalError; looked up, not imported, so start-up never pays for SQLAlchemy."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    return sa_exc is not None and isinstance(exc, sa_exc.OperationalError)


if __name__ == "__main__":
    main()
