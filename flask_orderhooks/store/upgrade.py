"""Upgrading a deliveries table made by an older version, in place.

Only for the extension's own database: with ``db=`` the table is the host's,
and Flask-Migrate's autogenerate writes the same changes as a migration.
Each step is checked and done on its own, so a process that died half-way
(SQLite runs DDL outside transactions) is finished by the next one, and two
processes upgrading at once end with the same table.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.engine import Connection

from .table import DUE_INDEX

logger = logging.getLogger("flask_orderhooks")


def upgrade_table(connection: Connection, table: sa.Table) -> list[str]:
    """Add what 0.2 added to a 0.1 table; what was done, by name.

    0.2 adds ``next_attempt_at`` (nullable: the rows stored by 0.1 keep their
    status and simply have no planned attempt) and its index.
    """
    inspector = sa.inspect(connection)
    columns = {column["name"] for column in inspector.get_columns(table.name)}
    indexes = {index["name"] for index in inspector.get_indexes(table.name)}
    operations = Operations(MigrationContext.configure(connection))
    done = []
    if "next_attempt_at" not in columns:
        column = table.c.next_attempt_at
        operations.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
        done.append("next_attempt_at")
    if DUE_INDEX not in indexes:
        where = sa.column("next_attempt_at").is_not(None)
        operations.create_index(
            DUE_INDEX,
            table.name,
            ["next_attempt_at"],
            postgresql_where=where,
            sqlite_where=where,
        )
        done.append(DUE_INDEX)
    if done:
        logger.warning("OrderHooks: upgraded the table %s: added %s", table.name, ", ".join(done))
    return done
