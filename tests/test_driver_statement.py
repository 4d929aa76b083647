"""DriverStatement: SQLAlchemy's SQL, parameters, exceptions and invalidation,
without Connection.execute()."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from flask_orderhooks.driver_statement import DriverStatement
from flask_orderhooks.store.table import BODY, WHEN, WHEN_COLUMN

SECRET_BODY = b"body-that-must-not-appear-in-errors"

metadata = sa.MetaData()
things = sa.Table(
    f"driver_things_{uuid.uuid4().hex[:8]}",
    metadata,
    sa.Column("key", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    # The store's own types: microseconds and large bodies on MySQL too.
    sa.Column("seen_at", WHEN_COLUMN, nullable=False),
    sa.Column("body", BODY, nullable=False),
)
insert = things.insert().values(
    key=sa.bindparam("p_key"),
    # A literal: converted once, when the statement is compiled.
    kind=sa.literal("thing", sa.String(20)),
    seen_at=sa.bindparam("p_at", type_=WHEN),
    body=sa.bindparam("p_body", type_=BODY),
)
select_kind = sa.select(things.c.kind, things.c.body).where(things.c.key == sa.bindparam("p_key"))


@pytest.fixture
def engine(database_uri: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_uri)
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def test_runs_with_the_dialects_conversions(engine: sa.Engine) -> None:
    """Values written through the driver read back through SQLAlchemy exactly
    as if SQLAlchemy had written them (SQLite stores datetimes as text)."""
    at = datetime(2026, 11, 21, 22, 30, 15, 123456, tzinfo=UTC)
    statement = DriverStatement(insert, engine.dialect)
    with engine.connect() as connection:
        connection.begin()
        assert (
            statement.first(connection, {"p_key": "a", "p_at": at, "p_body": b"\x00\xff"}) is None
        )
        connection.commit()
        row = connection.execute(sa.select(things)).one()
        # SQLAlchemy's own comparison against the stored text must match too.
        found = connection.execute(
            sa.select(things.c.key).where(things.c.seen_at == sa.bindparam("at", at, type_=WHEN))
        ).scalar_one()
    assert found == "a"
    assert (row.key, row.kind, bytes(row.body)) == ("a", "thing", b"\x00\xff")
    assert row.seen_at.replace(tzinfo=UTC) == at
    with engine.connect() as connection:
        kind_and_body = DriverStatement(select_kind, engine.dialect).first(
            connection, {"p_key": "a"}
        )
        missing = DriverStatement(select_kind, engine.dialect).first(connection, {"p_key": "zz"})
    assert kind_and_body is not None
    assert (kind_and_body[0], bytes(kind_and_body[1])) == ("thing", b"\x00\xff")
    assert missing is None


def test_driver_errors_are_sqlalchemys_with_parameters_hidden(engine: sa.Engine) -> None:
    statement = DriverStatement(insert, engine.dialect)
    params = {"p_key": "dup", "p_at": datetime.now(UTC), "p_body": SECRET_BODY}
    with engine.connect() as connection:
        connection.begin()
        statement.first(connection, params)
        with pytest.raises(sa.exc.IntegrityError) as caught:
            statement.first(connection, params)
        connection.rollback()
    error = caught.value
    assert isinstance(error.orig, engine.dialect.loaded_dbapi.Error)
    assert not error.connection_invalidated
    assert "INSERT INTO" in str(error)
    # No parameters at all: bodies and signed headers stay out of logs.
    assert "body-that-must-not" not in str(error)
    assert "body-that-must-not" not in repr(error)
    assert error.params is None


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
    indirect=True,
)
def test_a_lost_connection_is_invalidated(engine: sa.Engine) -> None:
    """As Connection.execute() would: the pool never hands the dead one out again
    (MySQL's 2006/2013 "server has gone away" / "lost connection")."""
    statement = DriverStatement(select_kind, engine.dialect)
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        pid = connection.exec_driver_sql(
            "SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()"
        ).scalar_one()
        connection.rollback()
        with engine.connect() as other:
            if postgres:
                other.execute(sa.select(sa.func.pg_terminate_backend(pid)))
            else:
                other.exec_driver_sql(f"KILL CONNECTION {int(pid)}")
        with pytest.raises(sa.exc.OperationalError) as caught:
            statement.first(connection, {"p_key": "a"})
        assert caught.value.connection_invalidated
        assert connection.invalidated
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT 1").scalar_one() == 1


def test_refuses_what_cannot_be_compiled_once(engine: sa.Engine) -> None:
    expanding = sa.select(things.c.key).where(
        things.c.key.in_(sa.bindparam("keys", expanding=True))
    )
    with pytest.raises(ValueError, match="expanding"):
        DriverStatement(expanding, engine.dialect)
    with pytest.raises(TypeError, match="Not a SQL statement"):
        DriverStatement(sa.schema.CreateTable(things), engine.dialect)


def test_repr_shows_the_sql_not_parameters(engine: sa.Engine) -> None:
    assert repr(DriverStatement(insert, engine.dialect)).startswith("<DriverStatement 'INSERT INTO")


def test_a_prefix_with_one_integer_parameter_in_each_paramstyle() -> None:
    """MariaDB's ``SET STATEMENT v = {} FOR`` before a statement: ``%(name)s``
    for pyformat, a ``%s`` placed first for the positional format style;
    other styles are refused rather than written wrong."""
    select = sa.select(things.c.kind).where(things.c.key == sa.bindparam("p_key"))
    prefix = ("SET STATEMENT innodb_lock_wait_timeout = {} FOR", "p_wait")
    url = "mysql+pymysql://u@127.0.0.1:1/x"
    positional_dialect = sa.create_engine(url, paramstyle="format").dialect
    positional = DriverStatement(select, positional_dialect, prefix=prefix)
    assert positional.sql.startswith("SET STATEMENT innodb_lock_wait_timeout = %s FOR SELECT")
    assert positional._order == ("p_wait", "p_key")
    # The wait is converted to an integer: MySQL refuses a fraction (error 1232).
    assert dict(positional._required)["p_wait"] is int
    named_dialect = sa.create_engine(url).dialect
    assert named_dialect.paramstyle == "pyformat"  # PyMySQL's default with SQLAlchemy 2.1
    named = DriverStatement(select, named_dialect, prefix=prefix)
    assert named.sql.startswith("SET STATEMENT innodb_lock_wait_timeout = %(p_wait)s FOR SELECT")
    with pytest.raises(ValueError, match="paramstyle"):
        DriverStatement(select, sa.create_engine("sqlite://").dialect, prefix=prefix)
