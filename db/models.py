"""The results database schema: scan jobs, their images, predictions, heatmaps, the bundle registry, and
the review workbench's accounts, verdicts and audit log.

Types are portable (JSON, string-backed enums, partial unique index declared for both dialects) so the
same models and migrations serve the embedded SQLite file and production PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from deepcovid.status import ImageStatus, JobStatus, ReviewState, Role, Verdict

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); make every timestamp aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _enum(cls: type[enum.Enum], name: str) -> sa.Enum:
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: sa.JSON(),
        datetime: sa.DateTime(timezone=True),
        float: sa.Double(),
    }


class ScanJob(Base):
    """One run of the screener over a source (a directory or an s3:// prefix) with one bundle."""

    __tablename__ = "scan_jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(sa.Text)
    bundle_id: Mapped[str] = mapped_column(sa.String(128))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_state"), default=JobStatus.running)
    detail: Mapped[str | None] = mapped_column(sa.Text)  # why it failed or was interrupted
    # "host:pid" of the ``screen`` process working on it; NULL for a job its workers run.
    runner: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Image(Base):
    """One image URI and what is known about the file; where it stands in each job is in ``job_images``."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    uri: Mapped[str] = mapped_column(sa.Text, unique=True)
    storage: Mapped[str] = mapped_column(sa.String(8))  # "file", "s3" or "dicomweb"
    size: Mapped[int | None] = mapped_column(sa.BigInteger)
    mtime: Mapped[datetime | None]
    etag: Mapped[str | None] = mapped_column(sa.String(128))
    sha256: Mapped[str | None] = mapped_column(sa.String(64))
    study_uid: Mapped[str | None] = mapped_column(sa.String(64))
    series_uid: Mapped[str | None] = mapped_column(sa.String(64))
    sop_uid: Mapped[str | None] = mapped_column(sa.String(64))
    view: Mapped[str | None] = mapped_column(sa.String(16))
    study_date: Mapped[str | None] = mapped_column(sa.String(8))  # DICOM StudyDate, YYYYMMDD
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobImage(Base):
    """One image's membership of one job: its state there, and the prediction it resolved to.

    Each job keeps its own list, so a later job over the same files never changes what an earlier one
    found. ``reused`` marks a prediction made by an earlier job with the same bundle.
    """

    __tablename__ = "job_images"
    __table_args__ = (
        sa.Index(None, "job_id", "state"),
        sa.Index(None, "image_id"),
        sa.Index(None, "prediction_id"),
    )

    job_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("scan_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[ImageStatus] = mapped_column(_enum(ImageStatus, "image_state"), default=ImageStatus.queued)
    attempts: Mapped[int] = mapped_column(default=0)
    failure_reason: Mapped[str | None] = mapped_column(sa.String(64))
    failure_detail: Mapped[str | None] = mapped_column(sa.Text)
    prediction_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("predictions.id", ondelete="SET NULL")
    )
    reused: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """One image scored by one bundle in one job. Unique on (image, bundle, job), so a redelivered chunk
    never duplicates, and rescoring in a later job leaves the earlier job's answer as it was."""

    __tablename__ = "predictions"
    # The unique index also serves "has this bundle scored this image" (its first two columns). The others
    # give the review worklist its orders without sorting a job (review.worklist).
    __table_args__ = (
        sa.UniqueConstraint("image_id", "bundle_id", "job_id"),
        sa.Index(None, "ensemble_decision", "ensemble_score", "image_id"),
        sa.Index(None, "ensemble_score", "image_id"),
        sa.Index(None, "disagreement", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("images.id", ondelete="CASCADE"))
    bundle_id: Mapped[str] = mapped_column(sa.String(128))
    job_id: Mapped[int | None] = mapped_column(BigId, sa.ForeignKey("scan_jobs.id", ondelete="SET NULL"))

    resnet18_probability: Mapped[float | None]
    resnet18_decision: Mapped[bool | None]
    resnet50_probability: Mapped[float | None]
    resnet50_decision: Mapped[bool | None]
    squeezenet1_1_probability: Mapped[float | None]
    squeezenet1_1_decision: Mapped[bool | None]
    densenet121_probability: Mapped[float | None]
    densenet121_decision: Mapped[bool | None]

    ensemble_score: Mapped[float | None]
    ensemble_decision: Mapped[bool | None]
    disagreement: Mapped[float | None]
    thresholds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    scored_at: Mapped[datetime] = mapped_column(default=utcnow)
    worker_host: Mapped[str | None] = mapped_column(sa.String(255))
    device: Mapped[str | None] = mapped_column(sa.String(64))


class Heatmap(Base):
    """The Grad-CAM artifact of one image under one bundle. Keyed like the artifact, by (image, bundle), so
    a redelivered chunk or a later job rewrites the same row; ``error`` says why no map was stored."""

    __tablename__ = "heatmaps"

    image_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    bundle_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    key: Mapped[str | None] = mapped_column(sa.String(255))  # opaque artifact key, never a path
    error: Mapped[str | None] = mapped_column(sa.String(255))  # why the map failed; the score stands
    geometry: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the crop, to overlay the original
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Publication(Base):
    """Where one image's DICOM SR report under one bundle was sent (a PACS service root), and how it went.

    Keyed by (image, bundle, destination) like the report's own UIDs, so publishing again updates the row;
    ``reason`` says why the last attempt failed (never a URI, never patient data)."""

    __tablename__ = "publications"

    image_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    bundle_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    destination: Mapped[str] = mapped_column(sa.String(255), primary_key=True)  # dicomweb:// service root
    state: Mapped[str] = mapped_column(sa.String(16))  # deepcovid.status.PublishStatus
    sop_uid: Mapped[str | None] = mapped_column(sa.String(64))  # the report's SOP Instance UID
    reason: Mapped[str | None] = mapped_column(sa.String(255))
    attempts: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class BundleRecord(Base):
    """A registered model bundle; exactly one may be active (a partial unique index enforces it)."""

    __tablename__ = "bundles"
    __table_args__ = (
        sa.Index(
            "uq_bundles_one_active",
            "active",
            unique=True,
            sqlite_where=sa.text("active = 1"),
            postgresql_where=sa.text("active"),
        ),
    )

    bundle_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    path: Mapped[str] = mapped_column(sa.Text)
    metrics: Mapped[dict[str, Any] | None]
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(default=False)


class User(Base):
    """A review workbench account; never deleted (reviews and the audit log name it), only disabled."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))  # argon2id, PHC string
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"), default=Role.reviewer)
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """One reviewer's verdict on an image (scored by ``bundle_id``); a reviewer's later verdict replaces
    theirs. ``adjudication`` marks an admin's final word on a disputed image."""

    __tablename__ = "reviews"
    __table_args__ = (
        sa.UniqueConstraint("image_id", "reviewer_id", "adjudication"),
        sa.Index(None, "bundle_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("images.id", ondelete="CASCADE"))
    bundle_id: Mapped[str] = mapped_column(sa.String(128))
    reviewer_id: Mapped[int] = mapped_column(BigId, sa.ForeignKey("users.id"))
    verdict: Mapped[Verdict] = mapped_column(_enum(Verdict, "verdict"))
    note: Mapped[str | None] = mapped_column(sa.Text)
    adjudication: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImageReview(Base):
    """Where an image stands with its reviewers, kept beside ``reviews`` in the same transaction so the
    worklist filters by review state with one join; an unreviewed image has no row."""

    __tablename__ = "image_reviews"
    __table_args__ = (sa.Index(None, "state"),)

    image_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[ReviewState] = mapped_column(_enum(ReviewState, "review_state"))
    consensus: Mapped[Verdict | None] = mapped_column(_enum(Verdict, "consensus"))
    reviews: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Who did what to which object, and when: every view and every verdict. Ids only, never a URI."""

    __tablename__ = "audit_log"
    __table_args__ = (sa.Index(None, "object_type", "object_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(BigId, sa.ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(sa.String(32))
    object_type: Mapped[str] = mapped_column(sa.String(16))
    object_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    detail: Mapped[str | None] = mapped_column(sa.String(255))
