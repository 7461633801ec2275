"""Alembic migrations for the phototag database, shipped inside the package."""
