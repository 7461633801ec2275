"""photo.sidecar_state: the photo's XMP sidecars as they were when their keywords were last read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 15:30:00

A scan (``phototag index``, the daemon's start-up and nightly rescans) compares it with the
sidecars on disk and reads the keywords again when they differ, so that keywords edited in
digiKam, darktable or Lightroom while the daemon was not running become searchable. Existing
rows start empty: a photo that has a sidecar gets its keywords read once more at the next scan.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("photo", sa.Column("sidecar_state", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("photo") as batch:
        batch.drop_column("sidecar_state")
