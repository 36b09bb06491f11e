"""Job membership: each job keeps its own list of images, their states and the predictions they resolved to.

Until now an image belonged to its *last* job (``images.last_job_id``), so screening a folder twice emptied
the first job. The upgrade moves each image's state, attempts and failure into ``job_images`` for the job
that held it, and also gives earlier jobs back the images they scored (from ``predictions.job_id``).
Predictions become unique per (image, bundle, job), so rescoring never rewrites an earlier job's answer.
Jobs gain the ``interrupted`` and ``failed`` states, a ``detail`` and the ``runner`` working on them.

The downgrade keeps each image's newest membership and, per (image, bundle), the newest prediction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)

OLD_JOB_STATES = ("running", "finished", "cancelled")
NEW_JOB_STATES = ("running", "finished", "interrupted", "failed", "cancelled")
OLD_IMAGE_STATES = ("queued", "scored", "failed", "skipped")
NEW_IMAGE_STATES = ("queued", "scored", "failed", "cancelled")

# The tables as this revision sees them, for the data-moving statements.
scan_jobs = sa.table("scan_jobs", sa.column("id"), sa.column("bundle_id"), sa.column("state"))
images = sa.table(
    "images",
    sa.column("id"),
    sa.column("state"),
    sa.column("attempt_count"),
    sa.column("failure_reason"),
    sa.column("failure_detail"),
    sa.column("last_job_id"),
    sa.column("updated_at"),
)
predictions = sa.table(
    "predictions",
    sa.column("id"),
    sa.column("image_id"),
    sa.column("bundle_id"),
    sa.column("job_id"),
    sa.column("scored_at"),
)
job_images = sa.table(
    "job_images",
    sa.column("job_id"),
    sa.column("image_id"),
    sa.column("state"),
    sa.column("attempts"),
    sa.column("failure_reason"),
    sa.column("failure_detail"),
    sa.column("prediction_id"),
    sa.column("reused"),
    sa.column("updated_at"),
)
MEMBERSHIP_COLUMNS = [
    "job_id",
    "image_id",
    "state",
    "attempts",
    "failure_reason",
    "failure_detail",
    "prediction_id",
    "reused",
    "updated_at",
]


def _state_check(name: str, column: str, states: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(state) for state in states)})"


def upgrade() -> None:
    op.create_table(
        "job_images",
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failure_reason", sa.String(64), nullable=True),
        sa.Column("failure_detail", sa.Text(), nullable=True),
        sa.Column("prediction_id", BigId, nullable=True),
        sa.Column("reused", sa.Boolean(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "image_id", name=op.f("pk_job_images")),
        sa.CheckConstraint(
            _state_check("image_state", "state", NEW_IMAGE_STATES), name=op.f("ck_job_images_image_state")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["scan_jobs.id"], name=op.f("fk_job_images_job_id_scan_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_job_images_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_job_images_prediction_id_predictions"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(op.f("ix_job_images_job_id_state"), "job_images", ["job_id", "state"])
    op.create_index(op.f("ix_job_images_image_id"), "job_images", ["image_id"])
    op.create_index(op.f("ix_job_images_prediction_id"), "job_images", ["prediction_id"])

    # Each image's membership of the job that held it; a scored one resolved to its bundle's prediction.
    held = images.join(scan_jobs, scan_jobs.c.id == images.c.last_job_id).outerjoin(
        predictions,
        sa.and_(
            predictions.c.image_id == images.c.id,
            predictions.c.bundle_id == scan_jobs.c.bundle_id,
            images.c.state == "scored",
        ),
    )
    op.execute(
        sa.insert(job_images).from_select(
            MEMBERSHIP_COLUMNS,
            sa.select(
                images.c.last_job_id,
                images.c.id,
                sa.case((images.c.state == "skipped", "cancelled"), else_=images.c.state),
                images.c.attempt_count,
                images.c.failure_reason,
                images.c.failure_detail,
                predictions.c.id,
                sa.case(
                    (
                        sa.and_(
                            predictions.c.job_id.is_not(None), predictions.c.job_id != images.c.last_job_id
                        ),
                        sa.true(),
                    ),
                    else_=sa.false(),
                ),
                images.c.updated_at,
            ).select_from(held),
        )
    )
    # Earlier jobs get back the images they scored and that a later job took from them.
    job = scan_jobs.alias("job")
    op.execute(
        sa.insert(job_images).from_select(
            MEMBERSHIP_COLUMNS,
            sa.select(
                predictions.c.job_id,
                predictions.c.image_id,
                sa.literal("scored"),
                sa.literal(0),
                sa.null(),
                sa.null(),
                predictions.c.id,
                sa.false(),
                predictions.c.scored_at,
            )
            .select_from(predictions.join(job, job.c.id == predictions.c.job_id))
            .where(
                predictions.c.bundle_id == job.c.bundle_id,
                ~sa.exists().where(
                    job_images.c.job_id == predictions.c.job_id,
                    job_images.c.image_id == predictions.c.image_id,
                ),
            ),
        )
    )

    with op.batch_alter_table("predictions") as batch:
        batch.drop_constraint(op.f("uq_predictions_image_id_bundle_id"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_predictions_image_id_bundle_id_job_id"), ["image_id", "bundle_id", "job_id"]
        )

    op.drop_index(op.f("ix_images_last_job_id_state"), table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint(op.f("fk_images_last_job_id_scan_jobs"), type_="foreignkey")
        batch.drop_constraint(op.f("ck_images_image_state"), type_="check")
        for column in ("state", "failure_reason", "failure_detail", "attempt_count", "last_job_id"):
            batch.drop_column(column)

    with op.batch_alter_table("scan_jobs") as batch:
        batch.drop_constraint(op.f("ck_scan_jobs_job_state"), type_="check")
        batch.create_check_constraint(
            op.f("ck_scan_jobs_job_state"), _state_check("job_state", "state", NEW_JOB_STATES)
        )
        batch.add_column(sa.Column("detail", sa.Text(), nullable=True))
        batch.add_column(sa.Column("runner", sa.String(255), nullable=True))


def downgrade() -> None:
    op.execute(
        sa.update(scan_jobs)
        .where(scan_jobs.c.state.in_(["interrupted", "failed"]))
        .values(state=sa.case((scan_jobs.c.state == "interrupted", "running"), else_="cancelled"))
    )
    with op.batch_alter_table("scan_jobs") as batch:
        batch.drop_column("runner")
        batch.drop_column("detail")
        batch.drop_constraint(op.f("ck_scan_jobs_job_state"), type_="check")
        batch.create_check_constraint(
            op.f("ck_scan_jobs_job_state"), _state_check("job_state", "state", OLD_JOB_STATES)
        )

    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="queued"))
        batch.add_column(sa.Column("failure_reason", sa.String(64), nullable=True))
        batch.add_column(sa.Column("failure_detail", sa.Text(), nullable=True))
        batch.add_column(sa.Column("attempt_count", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_job_id", BigId, nullable=True))
    # Each image goes back to its newest job, with its state there.
    newest = (
        sa.select(sa.func.max(job_images.c.job_id))
        .where(job_images.c.image_id == images.c.id)
        .scalar_subquery()
    )
    member = sa.and_(job_images.c.image_id == images.c.id, job_images.c.job_id == images.c.last_job_id)

    def of_newest(column: sa.ColumnElement) -> sa.ScalarSelect:
        return sa.select(column).where(member).scalar_subquery()

    op.execute(sa.update(images).values(last_job_id=newest))
    op.execute(
        sa.update(images)
        .where(images.c.last_job_id.is_not(None))
        .values(
            state=sa.case(
                (of_newest(job_images.c.state) == "cancelled", "skipped"), else_=of_newest(job_images.c.state)
            ),
            failure_reason=of_newest(job_images.c.failure_reason),
            failure_detail=of_newest(job_images.c.failure_detail),
            attempt_count=of_newest(job_images.c.attempts),
        )
    )
    with op.batch_alter_table("images") as batch:
        batch.create_check_constraint(
            op.f("ck_images_image_state"), _state_check("image_state", "state", OLD_IMAGE_STATES)
        )
        batch.create_foreign_key(
            op.f("fk_images_last_job_id_scan_jobs"), "scan_jobs", ["last_job_id"], ["id"], ondelete="SET NULL"
        )
    op.create_index(op.f("ix_images_last_job_id_state"), "images", ["last_job_id", "state"])
    op.drop_table("job_images")

    # One prediction per (image, bundle) again: the newest.
    newer = predictions.alias("newer")
    op.execute(
        sa.delete(predictions).where(
            sa.exists().where(
                newer.c.image_id == predictions.c.image_id,
                newer.c.bundle_id == predictions.c.bundle_id,
                newer.c.id > predictions.c.id,
            )
        )
    )
    with op.batch_alter_table("predictions") as batch:
        batch.drop_constraint(op.f("uq_predictions_image_id_bundle_id_job_id"), type_="unique")
        batch.create_unique_constraint(op.f("uq_predictions_image_id_bundle_id"), ["image_id", "bundle_id"])
