"""``deepcovid db upgrade / downgrade / current``: the results database's schema migrations."""

from __future__ import annotations

import typer

from cli.render import fail
from deepcovid.exitcodes import ExitCode
from deepcovid.settings import get_settings

URL_OPTION = typer.Option(None, "--url", help="Database URL (default: DEEPCOVID_DATABASE_URL).")


def upgrade_command(
    revision: str = typer.Option("head", "--revision", "-r", help="Target revision (default: newest)."),
    url: str = URL_OPTION,
) -> None:
    """Create or migrate the results database schema up to the newest (or given) revision."""
    from db import migrate  # Alembic: kept out of CLI start-up
    from db.engine import check_writable

    settings = get_settings()
    check_writable(url or settings.effective_database_url, data_dir=settings.data_dir)
    migrate.upgrade(url, revision)
    _report(url, migrate.current(url).current)


def downgrade_command(
    revision: str = typer.Argument(
        ..., help="Target revision: an id, base, or a relative step such as -1 (write `-- -1`)."
    ),
    url: str = URL_OPTION,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Migrate the results database schema down to REVISION (base drops every table: data is lost)."""
    from db import migrate  # Alembic: kept out of CLI start-up

    if not yes and not typer.confirm(
        f"Downgrade {_describe(url)} to {revision}? Tables a migration added are dropped with their data"
    ):
        raise fail("not confirmed: nothing changed (pass --yes to skip the question)", ExitCode.USAGE)

    from db.engine import check_writable

    settings = get_settings()
    check_writable(url or settings.effective_database_url, data_dir=settings.data_dir)
    migrate.downgrade(url, revision)
    _report(url, migrate.current(url).current)


def current_command(url: str = URL_OPTION) -> None:
    """Show the schema revision of the results database and whether it is the newest; exit 3 if not."""
    from db import migrate  # Alembic: kept out of CLI start-up

    status = migrate.current(url)
    typer.echo(f"database: {_describe(url)}")
    typer.echo(f"revision: {', '.join(status.current) or 'none (empty database)'}")
    head = ", ".join(status.heads)
    if status.is_head:
        typer.echo(f"head:     {head} (up to date)")
        return
    typer.echo(f"head:     {head}")
    raise fail("the schema is not current: run `deepcovid db upgrade`", ExitCode.SCHEMA_NOT_CURRENT)


def _report(url: str | None, revisions: tuple[str, ...]) -> None:
    typer.echo(f"{_describe(url)}: at revision {', '.join(revisions) or 'base'}")


def _describe(url: str | None) -> str:
    """The database URL, password hidden."""
    from db.engine import normalize_url  # SQLAlchemy: kept out of CLI start-up

    return normalize_url(url or get_settings().effective_database_url).render_as_string(hide_password=True)
