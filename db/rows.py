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

# Registering a listing: the images' own rows; an existing image gets fresh LISTING_COLUMNS.
LISTED_COLUMNS = ("uri", "storage", "size", "mtime", "etag")
LISTING_COLUMNS = ("storage", "size", "mtime", "etag", "updated_at")

# An image's membership of a job. Listing it (again) sets every column but the key; a result sets
# RESULT_MEMBER_COLUMNS and what it resolved to, and leaves the attempt count as the worker kept it.
MEMBER_KEY = ("job_id", "image_id")
MEMBER_COLUMNS = (
    *MEMBER_KEY,
    "state",
    "attempts",
    "failure_reason",
    "failure_detail",
    "prediction_id",
    "reused",
    "updated_at",
)
MEMBER_UPDATES = tuple(column for column in MEMBER_COLUMNS if column not in MEMBER_KEY)
RESULT_MEMBER_COLUMNS = ("state", "failure_reason", "failure_detail")
RESULT_MEMBER_UPDATES = (*RESULT_MEMBER_COLUMNS, "prediction_id", "reused", "updated_at")

# Storing a scored chunk: its images' rows. What any result learnt about the file fills KNOWN_COLUMNS in.
RESULT_IMAGE_COLUMNS = ("uri", "storage", "size", *DICOM_COLUMNS)
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
# A prediction is unique on its image, bundle and job; writing it again replaces every other column.
PREDICTION_KEY = ("image_id", "bundle_id", "job_id")
PREDICTION_UPDATES = tuple(column for column in PREDICTION_COLUMNS if column not in PREDICTION_KEY)


# Storing a scored chunk: the heatmaps of its images that asked for one, keyed like their artifact.
HEATMAP_KEY = ("image_id", "bundle_id")
HEATMAP_COLUMNS = ("key", "error", "geometry")
HEATMAP_UPDATES = (*HEATMAP_COLUMNS, "created_at")


def storage_kind(uri: str) -> str:
    if uri.startswith(("dicomweb://", "dicomwebs://")):
        return "dicomweb"
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


def member_row(
    job_id: int, image_id: int, resolved: tuple[int, int | None] | None, now: datetime
) -> dict[str, Any]:
    """A listed image's membership, keyed by MEMBER_COLUMNS: queued afresh, or scored already when
    ``resolved`` gives the (prediction id, its job) the bundle made; reused when another job made it."""
    prediction_id, made_by = resolved if resolved is not None else (None, None)
    return {
        "job_id": job_id,
        "image_id": image_id,
        "state": ImageStatus.queued if prediction_id is None else ImageStatus.scored,
        "attempts": 0,
        "failure_reason": None,
        "failure_detail": None,
        "prediction_id": prediction_id,
        "reused": prediction_id is not None and made_by != job_id,
        "updated_at": now,
    }


def result_image_row(result: ImageResult) -> dict[str, Any]:
    """What a scored or failed result learnt about its file, keyed by RESULT_IMAGE_COLUMNS."""
    return {
        "uri": result.uri,
        "storage": storage_kind(result.uri),
        "size": result.size,
        **dicom_columns(result.info),
    }


def result_member_row(result: ImageResult) -> dict[str, Any]:
    """Where a result leaves its image in the job, keyed by RESULT_MEMBER_COLUMNS."""
    scored = result.scored
    return {
        "state": ImageStatus.scored if scored else ImageStatus.failed,
        "failure_reason": None if scored else (result.reason or "internal_error"),
        "failure_detail": None if scored else (result.detail or None),
    }


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


def heatmap_row(result: ImageResult) -> dict[str, Any]:
    """A result's heatmap values, keyed by HEATMAP_COLUMNS (``result.heatmap`` must be set)."""
    assert result.heatmap is not None
    return {"key": result.heatmap.key, "error": result.heatmap.error, "geometry": result.heatmap.geometry}


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
    new: ReadOnlyColumnCollection[str, Any], existing: sa.FromClause
) -> dict[str, sa.ColumnElement[Any]]:
    """The SET list when a result's image row (``new``) meets the stored one (``existing``): what the
    result learnt fills in, and nothing it did not learn is forgotten."""
    return {
        **{column: sa.func.coalesce(new[column], existing.c[column]) for column in KNOWN_COLUMNS},
        "updated_at": new["updated_at"],
    }
