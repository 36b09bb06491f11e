"""Heatmaps: one Grad-CAM artifact per (image, bundle), with its crop geometry, or why it failed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "heatmaps",
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("error", sa.String(255), nullable=True),
        sa.Column("geometry", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "bundle_id", name=op.f("pk_heatmaps")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_heatmaps_image_id_images"), ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("heatmaps")
