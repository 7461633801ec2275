"""photo.attempt_started_at and photo.interruptions: tagging attempts that never ended.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 18:45:00

Set when a photo enters the tagger, cleared when its tags or its error are stored. A photo found
with it still set was being tagged when phototag died (a crash in an image library, an
out-of-memory kill): it is then tagged on its own, and given up on after a few such attempts in
a row (``interruptions``), so that one photo cannot stop the daemon over and over. Existing rows
start with no attempt open and no interruptions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("photo", sa.Column("attempt_started_at", sa.DateTime(), nullable=True))
    op.add_column("photo", sa.Column("interruptions", sa.Integer(), nullable=False,
                                     server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("photo") as batch:
        batch.drop_column("interruptions")
        batch.drop_column("attempt_started_at")
