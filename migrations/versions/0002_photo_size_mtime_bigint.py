"""photo.size and photo.mtime_ns become 64-bit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 10:09:27

A nanosecond mtime (about 1.7e18) overflows PostgreSQL's 32-bit INTEGER, and so does the size of
a file over 2 GiB. SQLite stores both as 64-bit integers either way, but its batch mode rebuilds
the photo table, which storage.migrate runs with foreign keys off so photo_tag rows survive.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("photo") as batch_op:
        for column in ("size", "mtime_ns"):
            batch_op.alter_column(
                column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
            )


def downgrade() -> None:
    with op.batch_alter_table("photo") as batch_op:
        for column in ("size", "mtime_ns"):
            batch_op.alter_column(
                column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
            )
