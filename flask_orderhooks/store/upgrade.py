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

logger = logging.getLogger("flask_orderhooks")

#: Columns added after 0.1, all nullable: the rows an older version stored
#: keep their status and simply have none (0.2: ``next_attempt_at``; 0.3:
#: ``reference``, ``failures``, ``compacted_at``).
ADDED_COLUMNS = ("next_attempt_at", "reference", "failures", "compacted_at")


def upgrade_table(connection: Connection, table: sa.Table) -> list[str]:
    """Add the columns and indexes of ``table`` that the stored table lacks;
    what was done, by name.

    Only additions, in the order of the table's definition: a column listed
    in :data:`ADDED_COLUMNS`, then any index of the definition (partial ones
    keep their ``WHERE``).
    """
    inspector = sa.inspect(connection)
    columns = {column["name"] for column in inspector.get_columns(table.name)}
    indexes = {index["name"] for index in inspector.get_indexes(table.name)}
    operations = Operations(MigrationContext.configure(connection))
    done = []
    for name in ADDED_COLUMNS:
        if name not in columns:
            column = table.c[name]
            operations.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
            done.append(name)
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        if index.name not in indexes:
            operations.create_index(
                str(index.name),
                table.name,
                [column.name for column in index.columns],
                **index.dialect_kwargs,
            )
            done.append(str(index.name))
    if done:
        logger.warning("OrderHooks: upgraded the table %s: added %s", table.name, ", ".join(done))
    return done
