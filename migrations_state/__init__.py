"""Alembic environment for migrator's state schema, shipped inside the package."""
