"""Everything a command prints goes through here: the consoles, errors, and tables.

Commands call domain functions and hand what comes back to these helpers, so every command reports an
error, a key/value record or a table the same way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from deepcovid.errors import UserError
from deepcovid.exitcodes import ExitCode

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # long paths and commands stay copyable

F = TypeVar("F", bound=Callable[..., Any])

UNBOUNDED_WIDTH = 1_000_000
"""Columns offered to a table measured for output that is not a terminal: more than any row needs."""


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
    table.add_column(style="bold", overflow="fold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    return table


def rows_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Sequence[str] = (),
) -> Table:
    """A table with a header row and no vertical rules, so more fits in 80 columns (and awk reads it).

    Every column folds a long value onto more lines rather than cutting it: put a URI column last, where it
    gets what the others leave. ``right``: the columns of numbers, aligned right.
    """
    table = Table(
        *columns,
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in table.columns:
        column.overflow = "fold"
        if column.header in right:
            column.justify = "right"
    for row in rows:
        table.add_row(*row)
    return table


def show(renderable: RenderableType, target: Console | None = None) -> None:
    """Print a table: on a terminal, folded to its width; piped or redirected, as wide as the longest row,
    so no value (a URI above all) is wrapped or cut for grep, cut and awk."""
    target = target or console
    if target.is_terminal:
        target.print(renderable)
    else:
        _wide(target.file, renderable).print(renderable)


def _wide(file: IO[str], renderable: RenderableType) -> Console:
    """A console on ``file`` exactly as wide as ``renderable`` wants (at least 80 columns)."""
    probe = Console(file=file, width=UNBOUNDED_WIDTH)
    width = Measurement.get(probe, probe.options, renderable).maximum
    return Console(file=file, width=max(width, 80))


# ----------------------------------------------------------------------------------------------------------
# Numbers for people. JSON and CSV never come here: they keep full precision.


def human(value: Any, digits: int = 3) -> str:
    """Any value as people read it: floats to ``digits`` decimals (tiny ones to ``digits`` significant
    digits, so a drift of 0.0002 does not read as 0), ints with thousands separators, None empty,
    booleans yes/no, lists and dicts as JSON of those rounded values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _float(value, digits, ",")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_rounded(value, digits))
    return str(value)


def _float(value: float, digits: int, separator: str = "") -> str:
    if not math.isfinite(value):
        return str(value)
    if value and abs(value) < 10**-digits:
        return f"{value:.{digits}g}"
    return f"{value:{separator}.{digits}f}"


def _rounded(value: Any, digits: int) -> Any:
    """``value`` with every float rounded as ``human`` prints it (for the JSON of a nested value)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(_float(value, digits))
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item, digits) for item in value]
    return value


def number(value: int) -> str:
    return human(value)


def score(value: float | None) -> str:
    """A probability, score or threshold for people: three decimals, empty when absent."""
    return human(value, 3)


def rate(per_s: float | None, unit: str = "images/s") -> str:
    """A speed for people: one decimal; ``-`` for a job nothing works on."""
    return "-" if per_s is None else f"{human(per_s, 1)} {unit}"


def duration(seconds: float | None) -> str:
    """A duration for people: ``42s``, ``3m 05s``, ``2h 07m``, ``3d 4h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = max(int(round(seconds)), 0)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@contextlib.contextmanager
def interruptible(message: str) -> Iterator[None]:
    """Ctrl-C inside the block prints ``message`` (what was kept, how to resume) and exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(message, highlight=False)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


def save(table: Table, path: Path) -> None:
    """Write a table to a file as wide as its longest row, so no row is wrapped as a terminal would."""
    with open(path, "w", encoding="utf-8") as fh:
        _wide(fh, table).print(table)


def check_output(path: Path | None, option: str = "--out") -> None:
    """Refuse, in one line, an output file whose folder does not exist (before any work is done)."""
    if path is not None and not path.parent.is_dir():
        raise fail(
            f"{option} {path}: the folder {path.parent} does not exist; create it or choose another",
            ExitCode.USAGE,
        )


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    """A metric with its 95% interval: ``0.912 (0.850-0.950)``; ``n/a`` when undefined."""
    if value is None:
        return "n/a"
    return f"{score(value)} ({score(low)}-{score(high)})" if low is not None else score(value)


def group_table(by: Mapping[str, Any]) -> Table:
    """``evaluate --by``: the ensemble per value of a labels column, with 95% intervals."""
    rows = []
    for row in by["groups"]:
        sens, spec, auc = row["sensitivity"], row["specificity"], row["roc_auc"]
        rows.append(
            (
                row["value"],
                f"{row['n_covid']}/{row['n_non_covid']}",
                _interval(sens["value"], *(sens["wilson"] or (None, None))),
                _interval(spec["value"], *(spec["wilson"] or (None, None))),
                _interval(auc["auc"], auc["ci_low"], auc["ci_high"]),
            )
        )
    columns = (by["column"], "covid/non", "sensitivity", "specificity", "AUC")
    return rows_table(f"Ensemble by {by['column']}", columns, rows, right=columns[1:])


def probe_table(probe: Mapping[str, Any]) -> Table:
    """The shortcut probe: cross-validated AUC of the label and of the column from each network's features."""
    column = probe["column"]
    rows = [
        (
            arch,
            score(m["label_auc"]) or "n/a",
            score(m["column_auc"]) or "n/a",
            score(m["column_auc_within_class"].get("non_covid")) or "n/a",
            score(m["column_auc_within_class"].get("covid")) or "n/a",
        )
        for arch, m in probe["networks"].items()
    ]
    columns = ("network", "label", f"{column}", "within non-COVID", "within COVID")
    title = f"Shortcut probe: {column} from the networks' features (cross-validated AUC)"
    return rows_table(title, columns, rows, right=columns[1:])
