"""photo.own_write: the size and hash of a keyword rewrite of the photo that phototag has begun.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 13:30:00

Recorded (and committed) just before phototag renames its rewrite of a JPEG into place, and
cleared when the write is recorded. A scanner that finds a file matching it knows the change is
phototag's own, even after a crash between the rename and the commit, and does not re-tag it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("photo", sa.Column("own_write", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("photo") as batch:
        batch.drop_column("own_write")
