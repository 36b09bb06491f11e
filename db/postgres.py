"""PostgreSQL's bulk writes: ``db.rows``' rows sent as typed arrays, one statement per batch or chunk.

Each column travels as one array parameter in binary format (``%(name)b``: psycopg packs a binary array
several times faster than it quotes a text one), which the server unpacks with ``unnest`` far more cheaply
than parsing JSON rows. Every call is a single statement in the caller's transaction (commit durable:
synchronous_commit is left as the server says). Statements go straight to psycopg so SQLAlchemy does not
walk the arrays element by element.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.engine import Connection

from db.rows import (
    LISTED_COLUMNS,
    LISTING_COLUMNS,
    PREDICTION_COLUMNS,
    PREDICTION_KEY,
    PREDICTION_SHARED,
    PREDICTION_UPDATES,
    REGISTER_SHARED,
    REQUEUE_COLUMNS,
    RESULT_IMAGE_COLUMNS,
    RESULT_IMAGE_SHARED,
    SCORE_COLUMNS,
    result_image_updates,
)
from db.tables import images, predictions
from deepcovid.status import ImageStatus

_DIALECT = psycopg.dialect()


def _array_type(column: sa.Column[Any]) -> str:
    """The element type a column's values travel as (binary arrays need a type the driver can pack)."""
    if isinstance(column.type, sa.JSON):
        return "json"
    python_type = column.type.python_type
    kinds = ((bool, "bool"), (int, "int8"), (float, "float8"), (datetime, "timestamptz"))
    return next((name for kind, name in kinds if issubclass(python_type, kind)), "text")


def _arrays(table: sa.Table, columns: Sequence[str]) -> str:
    """``%(name)b::type[], ...``: one array parameter per column, in order."""
    return ", ".join(f"%({name})b::{_array_type(table.c[name])}[]" for name in columns)


def _scalars(table: sa.Table, columns: Sequence[str]) -> dict[str, str]:
    """``%(name)s::type`` by column: one parameter for a value the whole batch shares."""
    return {name: f"%({name})s::{_array_type(table.c[name])}" for name in columns}


def _sql(expression: sa.ColumnElement[Any]) -> str:
    return str(expression.compile(dialect=_DIALECT))


def _set_list(assignments: Iterable[str]) -> str:
    return ",\n        ".join(assignments)


# --- registering a listing -----------------------------------------------------------------------------

# A scalar subquery (at most one row: uri and (image, bundle) are unique) runs per listed row as two index
# probes; the planner may turn an EXISTS into a hashed subplan reading every prediction of the bundle.
_SCORED = (
    "coalesce((SELECT true FROM images e JOIN predictions p ON p.image_id = e.id "
    "WHERE e.uri = s.uri AND p.bundle_id = %(bundle_id)s), false)"
)


def _register_sql(scored: str) -> str:
    """The register upsert; ``scored`` says whether a listed row (``s``) already has the bundle's prediction.

    The inserted state tells the upsert what to do with an existing image: REQUEUE_COLUMNS are set only
    where it says queued; an image the bundle already scored is marked scored and keeps its own.
    """
    values = {name: f"src.{name}" for name in LISTED_COLUMNS} | _scalars(images, REGISTER_SHARED)
    values["state"] = f"CASE WHEN scored THEN '{ImageStatus.scored.value}' ELSE {values['state']} END"
    requeue = f"excluded.state = '{ImageStatus.queued.value}'"
    updates = _set_list(
        [f"{name} = excluded.{name}" for name in LISTING_COLUMNS]
        + [f"{name} = CASE WHEN {requeue} THEN excluded.{name} ELSE i.{name} END" for name in REQUEUE_COLUMNS]
    )
    return f"""
WITH src AS MATERIALIZED (
    SELECT s.*, {scored} AS scored
    FROM unnest({_arrays(images, LISTED_COLUMNS)}) WITH ORDINALITY AS s({", ".join(LISTED_COLUMNS)}, ord)
),
upserted AS (
    INSERT INTO images AS i ({", ".join(values)})
    SELECT {", ".join(values.values())}
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        {updates}
)
SELECT ord FROM src WHERE scored
"""


_REGISTER = _register_sql(_SCORED)
_RESCORE = _register_sql("false")


def register_rows(
    conn: Connection,
    rows: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    bundle_id: str,
    *,
    rescore: bool,
) -> list[str]:
    """Upsert one batch of listed images (``db.rows.register_row``, one per URI, and what they share);
    returns the URIs to score, in order."""
    params = {**_columns(rows, LISTED_COLUMNS), **shared, "bundle_id": bundle_id}
    # Never a prepared statement: PostgreSQL could settle on a generic plan made while predictions was
    # empty, and a re-listed archive then registered at 69 rows/s (each probe a scan of all predictions).
    driver = conn.connection.driver_connection
    assert driver is not None
    sql = _RESCORE if rescore else _REGISTER
    scored = {ordinal for (ordinal,) in driver.execute(sql, params, prepare=False)}
    return [row["uri"] for ordinal, row in enumerate(rows, 1) if ordinal not in scored]


# --- storing a scored chunk ----------------------------------------------------------------------------


def _write_chunk_sql() -> str:
    # Upserting the chunk's images makes every image an index lookup through the arbiter index whatever
    # the planner's statistics say (an UPDATE ... FROM join can turn into a scan of the whole table).
    image_values = {name: f"src.{name}" for name in RESULT_IMAGE_COLUMNS} | _scalars(
        images, RESULT_IMAGE_SHARED
    )
    excluded = sa.table("excluded", *(sa.column(name) for name in image_values))
    image_updates = result_image_updates(sa.bindparam("job_id"), excluded.c, images.alias("i"))
    prediction_values = {
        "image_id": "ids.id",
        **_scalars(predictions, PREDICTION_SHARED),
        **{name: f"scores.{name}" for name in SCORE_COLUMNS},
    }
    return f"""
WITH src AS MATERIALIZED (
    SELECT * FROM unnest({_arrays(images, RESULT_IMAGE_COLUMNS)}) AS s({", ".join(RESULT_IMAGE_COLUMNS)})
),
images_written AS (
    INSERT INTO images AS i ({", ".join(image_values)})
    SELECT {", ".join(image_values.values())}
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        {_set_list(f"{name} = {_sql(value)}" for name, value in image_updates.items())}
    RETURNING i.id, i.uri
),
scores AS (
    SELECT * FROM unnest(%(scored_uri)b::text[], {_arrays(predictions, SCORE_COLUMNS)})
        AS s(uri, {", ".join(SCORE_COLUMNS)})
)
INSERT INTO predictions AS p ({", ".join(PREDICTION_COLUMNS)})
SELECT {", ".join(prediction_values[name] for name in PREDICTION_COLUMNS)}
FROM images_written AS ids
JOIN scores ON scores.uri = ids.uri
ON CONFLICT ({", ".join(PREDICTION_KEY)}) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in PREDICTION_UPDATES)}
"""


_WRITE_CHUNK = _write_chunk_sql()


def write_chunk(
    conn: Connection,
    image_rows: Sequence[dict[str, Any]],
    image_shared: dict[str, Any],
    scores: dict[str, dict[str, Any]],
    prediction_shared: dict[str, Any],
) -> None:
    """One statement: upsert the chunk's images (an unknown URI is created), then the scored ones'
    predictions (``scores`` by URI); each with the values the whole chunk shares.

    An image listed again by another job since this chunk was sent keeps that job's state; only its
    metadata is filled in.
    """
    score_rows = list(scores.values())
    params: dict[str, Any] = {
        **_columns(image_rows, RESULT_IMAGE_COLUMNS),
        **image_shared,
        "scored_uri": list(scores),
        **_columns(score_rows, SCORE_COLUMNS),
        **prediction_shared,
    }
    params["thresholds"] = _json_texts(params["thresholds"])
    conn.exec_driver_sql(_WRITE_CHUNK, params)


def _columns(rows: Sequence[dict[str, Any]], names: Iterable[str]) -> dict[str, list[Any]]:
    """The rows turned into one list per column."""
    return {name: [row[name] for row in rows] for name in names}


def _json_texts(values: Iterable[dict[str, float]]) -> list[str]:
    """Each dict as JSON text; a chunk's results nearly always share one thresholds dict."""
    texts: dict[tuple[tuple[str, float], ...], str] = {}
    out: list[str] = []
    for value in values:
        key = tuple(value.items())
        text = texts.get(key)
        if text is None:
            text = texts[key] = json.dumps(value)
        out.append(text)
    return out
