"""Alembic env: runs online against the connection migrator hands over in
``config.attributes["connection"]``, or against ``sqlalchemy.url`` when run by hand::

    alembic -c migrations_state/alembic.ini -x url=sqlite:///.migrator/state.db upgrade head
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from migrator.store.tables import metadata

config = context.config
target_metadata = metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
