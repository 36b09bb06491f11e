"""Initial schema: scan jobs, images, predictions, bundle registry.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
ARCHITECTURES = ("resnet18", "resnet50", "squeezenet1_1", "densenet121")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "scan_jobs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", _enum("job_state", "running", "finished", "cancelled"), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scan_jobs")),
    )
    op.create_table(
        "images",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("storage", sa.String(8), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mtime", Timestamp, nullable=True),
        sa.Column("etag", sa.String(128), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("series_uid", sa.String(64), nullable=True),
        sa.Column("sop_uid", sa.String(64), nullable=True),
        sa.Column("view", sa.String(16), nullable=True),
        sa.Column("state", _enum("image_state", "queued", "scored", "failed", "skipped"), nullable=False),
        sa.Column("failure_reason", sa.String(64), nullable=True),
        sa.Column("failure_detail", sa.Text(), nullable=True),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("last_job_id", BigId, nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("uri", name=op.f("uq_images_uri")),
        sa.ForeignKeyConstraint(
            ["last_job_id"],
            ["scan_jobs.id"],
            name=op.f("fk_images_last_job_id_scan_jobs"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(op.f("ix_images_last_job_id_state"), "images", ["last_job_id", "state"])

    per_model = []
    for arch in ARCHITECTURES:
        per_model.append(sa.Column(f"{arch}_probability", sa.Double(), nullable=True))
        per_model.append(sa.Column(f"{arch}_decision", sa.Boolean(), nullable=True))
    op.create_table(
        "predictions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("job_id", BigId, nullable=True),
        *per_model,
        sa.Column("ensemble_score", sa.Double(), nullable=True),
        sa.Column("ensemble_decision", sa.Boolean(), nullable=True),
        sa.Column("disagreement", sa.Double(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("scored_at", Timestamp, nullable=False),
        sa.Column("worker_host", sa.String(255), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint("image_id", "bundle_id", name=op.f("uq_predictions_image_id_bundle_id")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_predictions_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["scan_jobs.id"], name=op.f("fk_predictions_job_id_scan_jobs"), ondelete="SET NULL"
        ),
    )

    op.create_table(
        "bundles",
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("registered_at", Timestamp, nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("bundle_id", name=op.f("pk_bundles")),
    )
    op.create_index(
        "uq_bundles_one_active",
        "bundles",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active = 1"),
        postgresql_where=sa.text("active"),
    )


def downgrade() -> None:
    op.drop_index("uq_bundles_one_active", table_name="bundles")
    op.drop_table("bundles")
    op.drop_table("predictions")
    op.drop_index(op.f("ix_images_last_job_id_state"), table_name="images")
    op.drop_table("images")
    op.drop_table("scan_jobs")
