"""Alembic environment: runs on the connection storage.migrate passes in (no alembic.ini).

SQLite cannot ALTER most things, so migrations use batch mode there (copy and move the table).
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through storage.migrate (phototag db upgrade), not alembic")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)

with context.begin_transaction():
    context.run_migrations()
