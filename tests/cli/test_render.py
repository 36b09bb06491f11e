"""Output for people: tables that fold rather than cut in 80 columns, stay whole when piped, and numbers
rounded to what a reader needs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from cli.render import duration, human, number, rate, record_table, rows_table, save, score, show

LONG_URI = "/tmp/" + "screening-archive-2021/" * 4 + "ward-b/patient-0042/" + "x" * 12 + ".dcm"
COLUMNS = ("status", "ensemble", "flagged", "disagreement", "failure", "image")
LONG_FLOAT = re.compile(r"\d\.\d{4,}")


def _terminal(width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=True, color_system=None), out


def _piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80), out


def _results_table(uri: str = LONG_URI):
    rows = [("scored", score(1 / 3), human(True), score(2 / 3), "", uri), ("failed", "", "", "", "x", "/a")]
    return rows_table("Job 1", COLUMNS, rows, right=("ensemble",))


def test_the_uri_column_folds_in_80_columns_and_nothing_is_ellipsised() -> None:
    assert len(LONG_URI) > 120
    target, out = _terminal()
    show(_results_table(), target)
    text = out.getvalue()
    lines = text.splitlines()
    assert "…" not in text and "..." not in text
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "image" in line)
    start = header.index("image")
    body = lines[lines.index(header) + 2 :]  # after the header rule
    cells = [line[start:].strip() for line in body]
    folded = "".join(cell for cell in cells if cell != "/a")  # the second row's URI is short
    assert folded == LONG_URI
    assert "0.333" in text and not LONG_FLOAT.search(text)


def test_a_record_table_folds_a_long_value_in_80_columns() -> None:
    target, out = _terminal()
    show(record_table("Job 1", [("source", LONG_URI), ("state", "running")]), target)
    text = out.getvalue()
    assert "…" not in text
    pieces = [line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3]
    assert "".join(pieces).startswith(LONG_URI)


def test_piped_tables_are_as_wide_as_their_longest_row() -> None:
    target, out = _piped()
    assert not target.is_terminal
    show(_results_table(), target)
    show(record_table("Job 1", [("source", LONG_URI)]), target)
    lines = out.getvalue().splitlines()
    assert sum(LONG_URI in line for line in lines) == 2  # each table holds it whole on one line
    assert "…" not in out.getvalue()


def test_saved_tables_are_never_wrapped(tmp_path: Path) -> None:
    uri = "/" + "d" * 300 + ".png"
    save(_results_table(uri), tmp_path / "table.txt")
    assert any(uri in line for line in (tmp_path / "table.txt").read_text().splitlines())


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1 / 3, "0.333"),
        (2 / 3, "0.667"),
        (0.0, "0.000"),
        (1.0, "1.000"),
        (0.000123456, "0.000123"),  # a tiny drift keeps its digits
        (1234567, "1,234,567"),
        (None, ""),
        (True, "yes"),
        (False, "no"),
        ("as is", "as is"),
        ({"auc": 1 / 3, "n": 3, "ci": [0.1234567, None]}, '{"auc": 0.333, "n": 3, "ci": [0.123, null]}'),
        (float("nan"), "nan"),
    ],
)
def test_human_rounds_every_float(value: object, text: str) -> None:
    assert human(value) == text


def test_scores_rates_and_numbers() -> None:
    assert score(0.98765) == "0.988" and score(None) == ""
    assert rate(12.3456) == "12.3 images/s" and rate(1234.56, "img/s") == "1,234.6 img/s"
    assert human(12.3456, 1) == "12.3"
    assert number(1234) == "1,234"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (0.4, "0s"),
        (42.6, "43s"),
        (185, "3m 05s"),
        (3600 + 7 * 60 + 20, "1h 07m"),
        (3 * 86_400 + 4 * 3600 + 59, "3d 4h"),
        (float("inf"), "-"),
    ],
)
def test_durations_are_humanised(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text
