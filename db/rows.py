"""What each write puts in each column, stated once for both dialects.

SQLite sends these row dicts as rows of a multi-row upsert; PostgreSQL sends the same dicts turned into
one array per column. How a result's row merges into an existing image row is stated here too, as
SQLAlchemy expressions that SQLite runs and that PostgreSQL's hand-written statement renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from db.tables import held_by
from deepcovid.dicomfields import DICOM_COLUMNS, dicom_columns
from deepcovid.networks import ARCHITECTURES
from deepcovid.results import ImageResult
from deepcovid.status import ImageStatus


@dataclass(frozen=True)
class ImageRef:
    """One listed image: its URI and what storage said about it (used to notice changed files)."""

    uri: str
    storage: str | None = None  # "file" or "s3"; derived from the URI when left out
    size: int | None = None
    mtime: datetime | None = None
    etag: str | None = None


# Each write's columns come in two groups: values of each image (sent as rows, or PostgreSQL arrays) and
# values shared by the whole batch (merged into each row on SQLite, single parameters on PostgreSQL).

# Registering a listing.
LISTED_COLUMNS = ("uri", "storage", "size", "mtime", "etag")
REGISTER_SHARED = ("last_job_id", "state", "attempt_count", "failure_reason", "failure_detail", "updated_at")
# Registering refreshes these on every listed image; it sets REQUEUE_COLUMNS only on images to score.
LISTING_COLUMNS = ("storage", "size", "mtime", "etag", "last_job_id")
REQUEUE_COLUMNS = ("state", "attempt_count", "failure_reason", "failure_detail", "updated_at")

# Storing a scored chunk: its images' rows.
RESULT_IMAGE_COLUMNS = ("uri", "storage", "size", "state", "failure_reason", "failure_detail", *DICOM_COLUMNS)
RESULT_IMAGE_SHARED = ("attempt_count", "last_job_id", "updated_at")
# A result sets these only on an image its job holds (db.tables.held_by); another job's image keeps its own.
HELD_COLUMNS = ("state", "failure_reason", "failure_detail", "updated_at")
# What any result learnt about the file fills these in, whichever job holds the image.
KNOWN_COLUMNS = ("size", *DICOM_COLUMNS)

# Storing a scored chunk: its predictions (the image id comes from the images' upsert).
_NETWORK_COLUMNS = tuple((arch, f"{arch}_probability", f"{arch}_decision") for arch in ARCHITECTURES)
SCORE_COLUMNS = (
    *(column for _arch, *columns in _NETWORK_COLUMNS for column in columns),
    "ensemble_score",
    "ensemble_decision",
    "disagreement",
    "thresholds",
)
PREDICTION_SHARED = ("bundle_id", "job_id", "scored_at", "worker_host", "device")
PREDICTION_COLUMNS = ("image_id", *PREDICTION_SHARED, *SCORE_COLUMNS)
# A prediction is unique on its image and bundle; writing it again replaces every other column.
PREDICTION_KEY = ("image_id", "bundle_id")
PREDICTION_UPDATES = tuple(column for column in PREDICTION_COLUMNS if column not in PREDICTION_KEY)


def storage_kind(uri: str) -> str:
    return "s3" if uri.startswith("s3://") else "file"


def register_row(ref: ImageRef) -> dict[str, Any]:
    """A listed image's own values, keyed by LISTED_COLUMNS."""
    return {
        "uri": ref.uri,
        "storage": ref.storage or storage_kind(ref.uri),
        "size": ref.size,
        "mtime": ref.mtime,
        "etag": ref.etag,
    }


def register_shared(job_id: int, now: datetime) -> dict[str, Any]:
    """What registering sets on a batch of images, keyed by REGISTER_SHARED: queued afresh for ``job_id``."""
    return {
        "last_job_id": job_id,
        "state": ImageStatus.queued,
        "attempt_count": 0,
        "failure_reason": None,
        "failure_detail": None,
        "updated_at": now,
    }


def result_image_row(result: ImageResult) -> dict[str, Any]:
    """The image values a scored or failed result leaves, keyed by RESULT_IMAGE_COLUMNS."""
    scored = result.scored
    return {
        "uri": result.uri,
        "storage": storage_kind(result.uri),
        "size": result.size,
        "state": ImageStatus.scored if scored else ImageStatus.failed,
        "failure_reason": None if scored else (result.reason or "internal_error"),
        "failure_detail": None if scored else (result.detail or None),
        **dicom_columns(result.info),
    }


def result_image_shared(job_id: int, now: datetime) -> dict[str, Any]:
    """What a chunk's results set on all its images, keyed by RESULT_IMAGE_SHARED."""
    return {"attempt_count": 0, "last_job_id": job_id, "updated_at": now}


def score_row(result: ImageResult) -> dict[str, Any]:
    """A scored result's prediction values, keyed by SCORE_COLUMNS (absent networks as NULL)."""
    probabilities = result.probabilities or {}
    decisions = result.decisions or {}
    thresholds = result.thresholds or {}
    row: dict[str, Any] = {
        "ensemble_score": as_float(result.ensemble_score),
        "ensemble_decision": as_bool(result.ensemble_decision),
        "disagreement": as_float(result.disagreement),
        "thresholds": dict(zip(map(str, thresholds), map(float, thresholds.values()), strict=True)),
    }
    for arch, probability, decision in _NETWORK_COLUMNS:
        row[probability] = as_float(probabilities.get(arch))
        row[decision] = as_bool(decisions.get(arch))
    return row


def prediction_shared(
    *, bundle_id: str, job_id: int, now: datetime, worker_host: str | None, device: str | None
) -> dict[str, Any]:
    """What every prediction of one chunk shares, keyed by PREDICTION_SHARED."""
    return {
        "bundle_id": bundle_id,
        "job_id": job_id,
        "scored_at": now,
        "worker_host": worker_host,
        "device": device,
    }


def as_float(value: Any) -> float | None:
    """numpy scalars to plain floats (drivers do not adapt them); NaN stored as NULL."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def as_bool(value: Any) -> bool | None:
    """numpy booleans to plain ones; None stays NULL."""
    return None if value is None else bool(value)


def result_image_updates(
    job_id: Any, new: ReadOnlyColumnCollection[str, Any], existing: sa.FromClause
) -> dict[str, sa.ColumnElement[Any]]:
    """The SET list when a result's image row (``new``) meets the stored one (``existing``)."""
    held = held_by(job_id, existing)
    return {
        **{column: sa.case((held, new[column]), else_=existing.c[column]) for column in HELD_COLUMNS},
        **{column: sa.func.coalesce(new[column], existing.c[column]) for column in KNOWN_COLUMNS},
    }
