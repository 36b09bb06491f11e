"""Everything a command prints goes through here: the consoles, errors, and tables.

Commands call domain functions and hand what comes back to these helpers, so every command reports an
error, a key/value record or a table the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # long paths and commands stay copyable

F = TypeVar("F", bound=Callable[..., Any])


def error(message: str) -> None:
    """One ``error:`` line on standard error (markup in ``message`` is printed as text)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def fail(message: str, code: ExitCode = ExitCode.FAILURES) -> typer.Exit:
    """Print ``message`` as an error and return the Exit to raise: ``raise fail("...")``."""
    error(message)
    return typer.Exit(int(code))


def guarded(command: F) -> F:
    """A command whose UserError (from any domain function) becomes one error line and its exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise fail(exc.message, exc.exit_code) from None

    return run  # type: ignore[return-value]


def record_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table of labelled values (a job, a bundle): labels bold, no header."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    return table


def rows_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """A table with a header row; long cells wrap rather than being cut."""
    table = Table(*columns, title=title)
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(*row)
    return table


def number(value: int) -> str:
    return f"{value:,}"


def score(value: float | None) -> str:
    """A probability or score for people: three decimals, empty when absent."""
    return "" if value is None else f"{value:.3f}"


@contextlib.contextmanager
def interruptible(message: str) -> Iterator[None]:
    """Ctrl-C inside the block prints ``message`` (what was kept, how to resume) and exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(message, highlight=False)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


def save(table: Table, path: Path) -> None:
    """Write a table to a file, wide enough that rows are not wrapped as a terminal would."""
    with open(path, "w", encoding="utf-8") as fh:
        Console(file=fh, width=200).print(table)


def check_output(path: Path | None, option: str = "--out") -> None:
    """Refuse, in one line, an output file whose folder does not exist (before any work is done)."""
    if path is not None and not path.parent.is_dir():
        raise fail(
            f"{option} {path}: the folder {path.parent} does not exist; create it or choose another",
            ExitCode.USAGE,
        )
