"""Alembic environment: runs on the connection storage.migrate passes in (no alembic.ini).

SQLite cannot ALTER most things, so migrations use batch mode there (copy and move the table).
Offline mode (``sqlalchemy.url`` set, no connection) renders the SQL, e.g. for PostgreSQL.
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

config = context.config

if context.is_offline_mode():
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        render_as_batch=url.startswith("sqlite"),
        literal_binds=True,
    )
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through storage.migrate (phototag db upgrade)")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )

with context.begin_transaction():
    context.run_migrations()
