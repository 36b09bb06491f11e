"""The ``deepcovid`` command line: one entry point, commands contributed by each package.

Heavy imports (torch, SQLAlchemy, Celery) happen inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Deep-COVID Screen: screen chest X-ray archives for COVID-19 with a four-CNN ensemble.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bundle_app = typer.Typer(help="Create, inspect, register and promote model bundles.", no_args_is_help=True)
db_app = typer.Typer(help="Results database: migrations and checks.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(db_app, name="db")

GROUPS = {"bundle": bundle_app, "db": db_app}
console = Console()


@app.command()
def config() -> None:
    """Print the effective settings (from DEEPCOVID_* variables and .env), secrets masked."""
    from deepcovid.settings import get_settings

    table = Table("setting", "environment variable", "value", title="Effective settings")
    for name, value in get_settings().masked().items():
        table.add_row(name, f"DEEPCOVID_{name.upper()}", value)
    console.print(table)


def _register_all() -> None:
    from deepcovid import commands as core_commands

    core_commands.register(app, GROUPS)
    for module in ("db.cli", "producer.cli", "training.cli", "worker.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:  # a role package not installed in this deployment
            if exc.name and module.startswith(exc.name):
                continue
            raise
        mod.register(app, GROUPS)


_register_all()


def main() -> None:
    """Console entry point: known operational errors become one clear line and an exit code."""
    try:
        app()
    except Exception as exc:
        code = _exit_code_for(exc)
        if code is None:
            raise
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(code) from None


def _exit_code_for(exc: Exception) -> int | None:
    """Map the errors a user can fix (schema not migrated, database unreachable) to exit codes."""
    from sqlalchemy.exc import OperationalError

    from db.schema import SchemaNotCurrent

    if isinstance(exc, SchemaNotCurrent):
        return 3
    if isinstance(exc, OperationalError):
        return 15
    return None


if __name__ == "__main__":
    main()
