"""Publications: where each image's DICOM SR report was sent (per bundle and PACS) and how it went.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "publications",
        sa.Column("image_id", BigId, nullable=False),
        sa.Column("bundle_id", sa.String(128), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "bundle_id", "destination", name=op.f("pk_publications")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_publications_image_id_images"), ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("publications")
