"""Reviews: workbench accounts, reviewers' verdicts with each image's review state, the audit log, and the
DICOM study date the worklist sorts by.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


VERDICTS = ("covid", "not_covid", "indeterminate", "not_chest_xray")
WORKLIST_INDEXES = (
    ("ensemble_decision", "ensemble_score", "image_id"),
    ("ensemble_score", "image_id"),
    ("disagreement", "image_id"),
)


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("study_date", sa.String(8), nullable=True))
    # The worklist's keyset orders (review.worklist), read backwards from the top.
    for columns in WORKLIST_INDEXES:
        op.create_index(op.f("ix_predictions_" + "_".join(columns)), "predictions", list(columns))
    op.create_table(
        "users",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", _enum("user_role", "reviewer", "admin"), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "reviews",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("reviewer_id", BigId, nullable=False),
        sa.Column("verdict", _enum("verdict", *VERDICTS), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("adjudication", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_reviews_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["reviewer_id"], ["users.id"], name=op.f("fk_reviews_reviewer_id_users")),
        sa.UniqueConstraint(
            "image_id",
            "reviewer_id",
            "adjudication",
            name=op.f("uq_reviews_image_id_reviewer_id_adjudication"),
        ),
    )
    op.create_index(op.f("ix_reviews_bundle_id_image_id"), "reviews", ["bundle_id", "image_id"])
    op.create_table(
        "image_reviews",
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("state", _enum("review_state", "unreviewed", "reviewed", "disputed"), nullable=False),
        sa.Column("consensus", _enum("consensus", *VERDICTS), nullable=True),
        sa.Column("reviews", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_image_reviews")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_image_reviews_image_id_images"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("ix_image_reviews_state"), "image_reviews", ["state"])
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", BigId, nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("object_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_audit_log_user_id_users")),
    )
    op.create_index(op.f("ix_audit_log_at"), "audit_log", ["at"])
    op.create_index(op.f("ix_audit_log_object_type_object_id"), "audit_log", ["object_type", "object_id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("image_reviews")
    op.drop_table("reviews")
    op.drop_table("users")
    for columns in WORKLIST_INDEXES:
        op.drop_index(op.f("ix_predictions_" + "_".join(columns)), "predictions")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("study_date")
