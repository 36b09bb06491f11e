"""SQL errors never carry a URI: no bound parameters, no server DETAIL/CONTEXT lines (issue 12, item 7).

A URI is patient data, and a database error's text ends up in worker logs and Flower tracebacks.
"""

from __future__ import annotations

import traceback

import pytest
import sqlalchemy as sa

from db.models import Image

# Checked in tracebacks too, so the marker must not appear in any source line they quote.
MARKER = "Qwzx"
URI = f"/archive/{MARKER}^PRIVACY_4242/study/1.png"


def _all_text(exc: BaseException) -> str:
    """Everything a log or a traceback could show of the exception and its chain."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


def _insert(conn: sa.Connection, uri: str) -> None:
    conn.execute(sa.insert(Image).values(uri=uri, storage="file"))


def test_a_unique_violation_does_not_show_the_uri(migrated_engine: sa.Engine) -> None:
    with migrated_engine.begin() as conn:
        _insert(conn, URI)
    with pytest.raises(sa.exc.IntegrityError) as caught, migrated_engine.begin() as conn:
        _insert(conn, URI)
    text = _all_text(caught.value)
    assert MARKER not in text
    # Still says what went wrong.
    assert "unique" in text.lower()


def test_a_not_null_violation_does_not_show_the_row(migrated_engine: sa.Engine) -> None:
    # PostgreSQL adds "DETAIL: Failing row contains (..., <uri>, ...)".
    with pytest.raises(sa.exc.IntegrityError) as caught, migrated_engine.begin() as conn:
        conn.execute(sa.insert(Image).values(uri=URI, storage=None))
    assert MARKER not in _all_text(caught.value)


def test_a_failed_query_does_not_show_its_parameters(migrated_engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError) as caught, migrated_engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM no_such_table WHERE uri = :uri"), {"uri": URI})
    assert MARKER not in _all_text(caught.value)
