"""Upgrading a table made by an earlier 0.3 build: every column already
there, only the ``(status, created_at)`` index missing.

0.3.0 is not released, but its development builds made tables without that
index (the benchmarks' among them). Both upgrade paths must add just the
index: the own store on first use, and Flask-Migrate's autogenerate with
``db=``. The upgrades from 0.1 and 0.2 are in ``tests/test_upgrade.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_orderhooks import OrderHooks
from flask_orderhooks.store import TABLE_NAME, deliveries_table
from flask_orderhooks.store.table import STATUS_CREATED_INDEX
from flask_orderhooks.store.upgrade import upgrade_table
from tests.conftest import BACKENDS, BASE_CONFIG

pytestmark = pytest.mark.parametrize("backend", BACKENDS)

WHEN = datetime(2026, 5, 4, 12, 30, tzinfo=UTC)


@pytest.fixture
def engine(empty_database_url: str) -> Iterator[sa.Engine]:
    """An earlier 0.3 build's table at ``empty_database_url``, holding one done delivery."""
    engine = sa.create_engine(empty_database_url)
    table = deliveries_table(sa.MetaData())
    (index,) = [i for i in table.indexes if i.name == STATUS_CREATED_INDEX]
    with engine.begin() as connection:
        table.create(connection)
        index.drop(connection)
        connection.execute(
            table.insert(),
            {
                "provider": "igv",
                "callback": "order-status",
                "key": "k-1",
                "status": "done",
                "attempts": 1,
                "claim_token": "0" * 32,
                "lease_expires_at": WHEN,
                "body": b"{}",
                "body_sha256": "0" * 64,
                "headers": "{}",
                "created_at": WHEN,
                "updated_at": WHEN,
            },
        )
    yield engine
    engine.dispose()


def _indexes(engine: sa.Engine) -> dict[str, list[str]]:
    return {
        str(i["name"]): [str(c) for c in i["column_names"]]
        for i in sa.inspect(engine).get_indexes(TABLE_NAME)
    }


def test_own_store_adds_only_the_index(
    empty_database_url: str, engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert STATUS_CREATED_INDEX not in _indexes(engine)
    app = Flask("upgrade_0_3", instance_path=str(tmp_path / "instance"))
    app.config.update(BASE_CONFIG, ORDERHOOKS_DATABASE_URI=empty_database_url)
    hooks = OrderHooks(app)
    caplog.set_level(logging.WARNING, logger="flask_orderhooks")
    try:
        hooks.create_all(app)
        assert [r.getMessage() for r in caplog.records if r.name == "flask_orderhooks"] == [
            f"OrderHooks: upgraded the table {TABLE_NAME}: added {STATUS_CREATED_INDEX}"
        ]
        assert _indexes(engine)[STATUS_CREATED_INDEX] == ["status", "created_at"]
        (row,) = hooks.state(app).store.get("k-1")
        assert (row.status, row.created_at) == ("done", WHEN), "the old row is kept"
    finally:
        standalone = hooks.state(app).standalone
        assert standalone is not None
        standalone.engine.dispose()


def test_autogenerate_adds_only_the_index(
    empty_database_url: str, engine: sa.Engine, tmp_path: Path
) -> None:
    """With ``db=``, what ``flask db migrate`` compares: one index to add,
    and nothing once it is there."""
    app = Flask("upgrade_0_3_host", instance_path=str(tmp_path / "instance"))
    app.config.update(BASE_CONFIG, SQLALCHEMY_DATABASE_URI=empty_database_url)
    db = SQLAlchemy(app)
    OrderHooks(app, db=db)
    try:
        with app.app_context(), db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), db.metadata)
            assert [(d[0], d[1].name, [c.name for c in d[1].columns]) for d in diff] == [
                ("add_index", STATUS_CREATED_INDEX, ["status", "created_at"])
            ]
            (table,) = db.metadata.tables.values()
            # What the migration's op.create_index() does (the same Alembic
            # operation); tests/test_upgrade.py runs Flask-Migrate itself.
            assert upgrade_table(connection, table) == [STATUS_CREATED_INDEX]
            connection.commit()
            assert compare_metadata(MigrationContext.configure(connection), db.metadata) == []
    finally:
        with app.app_context():
            db.engine.dispose()
