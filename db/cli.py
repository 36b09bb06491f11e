"""Commands contributed by the `db` package: ``deepcovid db upgrade / downgrade / current``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# Exit status of any command that finds the schema missing or out of date.
SCHEMA_EXIT_CODE = 3


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Attach this package's commands to the CLI (called by deepcovid.cli)."""
    db_app = groups["db"]
    db_app.command("upgrade")(upgrade_command)
    db_app.command("downgrade")(downgrade_command)
    db_app.command("current")(current_command)


def open_database(url: str | None = None) -> Engine:
    """The engine for commands that read or write results: exits with status 3 when migrations are due.

    Other packages' commands call this instead of make_engine + ensure_schema_current so the user sees
    one clean line ("run `deepcovid db upgrade`") rather than a traceback.
    """
    from db.engine import make_engine
    from db.schema import SchemaNotCurrent, ensure_schema_current

    engine = make_engine(url)
    try:
        ensure_schema_current(engine)
    except SchemaNotCurrent as exc:
        _error(str(exc))
        raise typer.Exit(SCHEMA_EXIT_CODE) from None
    return engine


def _error(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def _describe_url(url: str | None) -> str:
    from db.engine import normalize_url
    from deepcovid.settings import get_settings

    target = url or get_settings().effective_database_url
    return normalize_url(target).render_as_string(hide_password=True)


def upgrade_command(
    revision: str = typer.Option("head", "--revision", "-r", help="Target revision (default: newest)."),
    url: str = typer.Option(None, "--url", help="Database URL (default: DEEPCOVID_DATABASE_URL)."),
) -> None:
    """Create or migrate the results database schema up to the newest (or given) revision."""
    from db import migrate

    migrate.upgrade(url, revision)
    status = migrate.current(url)
    typer.echo(f"{_describe_url(url)}: at revision {', '.join(status.current) or 'base'}")


def downgrade_command(
    revision: str = typer.Argument(
        ..., help="Target revision: an id, base, or a relative step such as -1 (write `-- -1`)."
    ),
    url: str = typer.Option(None, "--url", help="Database URL (default: DEEPCOVID_DATABASE_URL)."),
) -> None:
    """Migrate the results database schema down to REVISION (base drops every table: data is lost)."""
    from db import migrate

    migrate.downgrade(url, revision)
    status = migrate.current(url)
    typer.echo(f"{_describe_url(url)}: at revision {', '.join(status.current) or 'base'}")


def current_command(
    url: str = typer.Option(None, "--url", help="Database URL (default: DEEPCOVID_DATABASE_URL)."),
) -> None:
    """Show the schema revision of the results database and whether it is the newest; exit 3 if not."""
    from db import migrate

    status = migrate.current(url)
    current = ", ".join(status.current) or "none (empty database)"
    head = ", ".join(status.heads)
    typer.echo(f"database: {_describe_url(url)}")
    typer.echo(f"revision: {current}")
    if status.is_head:
        typer.echo(f"head:     {head} (up to date)")
        return
    typer.echo(f"head:     {head}")
    _error("the schema is not current: run `deepcovid db upgrade`")
    raise typer.Exit(SCHEMA_EXIT_CODE)
