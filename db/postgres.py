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
    HEATMAP_COLUMNS,
    HEATMAP_KEY,
    HEATMAP_UPDATES,
    LISTED_COLUMNS,
    LISTING_COLUMNS,
    MEMBER_COLUMNS,
    MEMBER_KEY,
    MEMBER_UPDATES,
    PREDICTION_COLUMNS,
    PREDICTION_KEY,
    PREDICTION_SHARED,
    PREDICTION_UPDATES,
    RESULT_IMAGE_COLUMNS,
    RESULT_MEMBER_COLUMNS,
    RESULT_MEMBER_UPDATES,
    SCORE_COLUMNS,
    result_image_updates,
)
from db.tables import heatmaps, images, job_images, predictions
from deepcovid.status import ImageStatus

_DIALECT = psycopg.dialect()
# Every column a statement below sends, by name, for its type (the images' columns win a shared name).
_COLUMNS = {
    column.name: column for table in (heatmaps, predictions, job_images, images) for column in table.c
}


def _array_type(column: sa.Column[Any]) -> str:
    """The element type a column's values travel as (binary arrays need a type the driver can pack)."""
    if isinstance(column.type, sa.JSON):
        return "json"
    python_type = column.type.python_type
    kinds = ((bool, "bool"), (int, "int8"), (float, "float8"), (datetime, "timestamptz"))
    return next((name for kind, name in kinds if issubclass(python_type, kind)), "text")


def _arrays(columns: Sequence[str]) -> str:
    """``%(name)b::type[], ...``: one array parameter per column, in order."""
    return ", ".join(f"%({name})b::{_array_type(_COLUMNS[name])}[]" for name in columns)


def _scalar(name: str) -> str:
    """``%(name)s::type``: one parameter for a value the whole batch shares."""
    return f"%({name})s::{_array_type(_COLUMNS[name])}"


def _sql(expression: sa.ColumnElement[Any]) -> str:
    return str(expression.compile(dialect=_DIALECT))


def _set_list(assignments: Iterable[str]) -> str:
    return ",\n        ".join(assignments)


# --- registering a listing -----------------------------------------------------------------------------

# The bundle's newest prediction for an image: at most a few rows, found through the unique index on
# (image, bundle, job) as an index probe per listed row whatever the planner thinks of the table.
_NEWEST = (
    "SELECT id, job_id FROM predictions WHERE image_id = u.id AND bundle_id = %(bundle_id)s{only_job} "
    "ORDER BY id DESC LIMIT 1"
)


def _register_sql(*, rescore: bool) -> str:
    """Upsert the listed images, then their memberships of the job; returns the ordinals of those the
    bundle already scored (with ``rescore``, only in this job), which join the job as scored."""
    newest = _NEWEST.format(only_job=" AND job_id = %(job_id)s::int8" if rescore else "")
    member = {
        "job_id": _scalar("job_id"),
        "image_id": "image_id",
        "state": f"CASE WHEN prediction_id IS NULL THEN '{ImageStatus.queued.value}' "
        f"ELSE '{ImageStatus.scored.value}' END",
        "attempts": "0",
        "failure_reason": "NULL",
        "failure_detail": "NULL",
        "prediction_id": "prediction_id",
        "reused": "prediction_id IS NOT NULL AND made_by IS DISTINCT FROM %(job_id)s::int8",
        "updated_at": _scalar("updated_at"),
    }
    assert tuple(member) == MEMBER_COLUMNS
    return f"""
WITH src AS MATERIALIZED (
    SELECT * FROM unnest({_arrays(LISTED_COLUMNS)}) WITH ORDINALITY AS s({", ".join(LISTED_COLUMNS)}, ord)
),
upserted AS (
    INSERT INTO images AS i ({", ".join(LISTED_COLUMNS)}, updated_at)
    SELECT {", ".join(LISTED_COLUMNS)}, {_scalar("updated_at")}
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in LISTING_COLUMNS)}
    RETURNING i.id, i.uri
),
resolved AS MATERIALIZED (
    SELECT src.ord, u.id AS image_id, p.id AS prediction_id, p.job_id AS made_by
    FROM src
    JOIN upserted AS u ON u.uri = src.uri
    LEFT JOIN LATERAL ({newest}) AS p ON true
),
members AS (
    INSERT INTO job_images AS m ({", ".join(MEMBER_COLUMNS)})
    SELECT {", ".join(member.values())}
    FROM resolved
    ON CONFLICT ({", ".join(MEMBER_KEY)}) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in MEMBER_UPDATES)}
)
SELECT ord FROM resolved WHERE prediction_id IS NOT NULL
"""


_REGISTER = _register_sql(rescore=False)
_RESCORE = _register_sql(rescore=True)


def register_rows(
    conn: Connection,
    rows: Sequence[dict[str, Any]],
    job_id: int,
    bundle_id: str,
    now: datetime,
    *,
    rescore: bool,
) -> list[str]:
    """Upsert one batch of listed images (``db.rows.register_row``, one per URI) and their memberships
    of ``job_id``; returns the URIs to score, in order."""
    params = {**_columns(rows, LISTED_COLUMNS), "job_id": job_id, "bundle_id": bundle_id, "updated_at": now}
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
    source = (*RESULT_IMAGE_COLUMNS, *RESULT_MEMBER_COLUMNS)
    image_values = {name: f"src.{name}" for name in RESULT_IMAGE_COLUMNS} | {
        "updated_at": _scalar("updated_at")
    }
    excluded = sa.table("excluded", *(sa.column(name) for name in image_values))
    image_updates = result_image_updates(excluded.c, images.alias("i"))
    prediction_values = {
        "image_id": "ids.id",
        **{name: _scalar(name) for name in PREDICTION_SHARED},
        **{name: f"scores.{name}" for name in SCORE_COLUMNS},
    }
    member = {
        "job_id": _scalar("job_id"),
        "image_id": "ids.id",
        **{name: f"src.{name}" for name in RESULT_MEMBER_COLUMNS},
        "attempts": "0",
        "prediction_id": "written.id",
        "reused": "false",
        "updated_at": _scalar("updated_at"),
    }
    return f"""
WITH src AS MATERIALIZED (
    SELECT * FROM unnest({_arrays(source)}) AS s({", ".join(source)})
),
ids AS (
    INSERT INTO images AS i ({", ".join(image_values)})
    SELECT {", ".join(image_values.values())}
    FROM src
    ON CONFLICT (uri) DO UPDATE SET
        {_set_list(f"{name} = {_sql(value)}" for name, value in image_updates.items())}
    RETURNING i.id, i.uri
),
scores AS (
    SELECT * FROM unnest(%(scored_uri)b::text[], {_arrays(SCORE_COLUMNS)})
        AS s(uri, {", ".join(SCORE_COLUMNS)})
),
written AS (
    INSERT INTO predictions AS p ({", ".join(PREDICTION_COLUMNS)})
    SELECT {", ".join(prediction_values[name] for name in PREDICTION_COLUMNS)}
    FROM ids
    JOIN scores ON scores.uri = ids.uri
    ON CONFLICT ({", ".join(PREDICTION_KEY)}) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in PREDICTION_UPDATES)}
    RETURNING p.id, p.image_id
)
INSERT INTO job_images AS m ({", ".join(member)})
SELECT {", ".join(member.values())}
FROM ids
JOIN src ON src.uri = ids.uri
LEFT JOIN written ON written.image_id = ids.id
WHERE EXISTS (SELECT 1 FROM scan_jobs WHERE id = %(job_id)s::int8 AND bundle_id = %(bundle_id)s)
ON CONFLICT ({", ".join(MEMBER_KEY)}) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in RESULT_MEMBER_UPDATES)}
    WHERE m.state <> '{ImageStatus.cancelled.value}'
"""


_WRITE_CHUNK = _write_chunk_sql()


def write_chunk(
    conn: Connection,
    image_rows: Sequence[dict[str, Any]],
    member_rows: Sequence[dict[str, Any]],
    scores: dict[str, dict[str, Any]],
    prediction_shared: dict[str, Any],
) -> None:
    """One statement: upsert the chunk's images (an unknown URI is created), the scored ones' predictions
    (``scores`` by URI) and every image's membership of the job (``member_rows``, in the images' order).

    A membership the job's closing cancelled keeps its state; the prediction is still stored.
    """
    score_rows = list(scores.values())
    params: dict[str, Any] = {
        **_columns(image_rows, RESULT_IMAGE_COLUMNS),
        **_columns(member_rows, RESULT_MEMBER_COLUMNS),
        "scored_uri": list(scores),
        **_columns(score_rows, SCORE_COLUMNS),
        **prediction_shared,
        "updated_at": prediction_shared["scored_at"],
    }
    params["thresholds"] = _json_texts(params["thresholds"])
    conn.exec_driver_sql(_WRITE_CHUNK, params)


_WRITE_HEATMAPS = f"""
INSERT INTO heatmaps AS h ({", ".join(HEATMAP_KEY)}, {", ".join(HEATMAP_UPDATES[len(HEATMAP_COLUMNS) :])},
    {", ".join(HEATMAP_COLUMNS)})
SELECT i.id, {_scalar("bundle_id")}, {_scalar("created_at")}, {", ".join(f"m.{c}" for c in HEATMAP_COLUMNS)}
FROM unnest(%(uri)b::text[], {_arrays(HEATMAP_COLUMNS)}) AS m(uri, {", ".join(HEATMAP_COLUMNS)})
JOIN images AS i ON i.uri = m.uri
ON CONFLICT ({", ".join(HEATMAP_KEY)}) DO UPDATE SET
        {_set_list(f"{name} = excluded.{name}" for name in HEATMAP_UPDATES)}
"""


def write_heatmaps(conn: Connection, maps: dict[str, dict[str, Any]], bundle_id: str, now: datetime) -> None:
    """One statement: upsert the heatmaps of a chunk's images (``maps``: ``db.rows.heatmap_row`` by URI,
    images already stored by ``write_chunk`` in the same transaction)."""
    params: dict[str, Any] = {
        "uri": list(maps),
        **_columns(list(maps.values()), HEATMAP_COLUMNS),
        "bundle_id": bundle_id,
        "created_at": now,
    }
    params["geometry"] = [json.dumps(value) for value in params["geometry"]]
    conn.exec_driver_sql(_WRITE_HEATMAPS, params)


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
