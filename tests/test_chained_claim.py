"""PostgreSQL's inline first delivery on one connection: the claim, its
``COMMIT AND CHAIN``, the done mark and the row's state in one pipeline
(``DeliveryStore._deliver_chained``), the rule kept: the claim is committed
before any receiver runs, and the host's own writes never ride with it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.testing import SignedCallback, build
from tests.conftest import Credit, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

#: The round trip that claims and marks: the claim, its commit, the done
#: mark (uncommitted) and the row's state.
PIPELINE = "INSERT orderhooks_deliveries | COMMIT AND CHAIN | UPDATE orderhooks_deliveries | SELECT"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]


def _callback(app: Flask, kind: str = "igv") -> SignedCallback:
    with app.app_context():
        return build(kind, app=app)


def _post(app: Flask, cb: SignedCallback) -> Any:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)


class Wire:
    """libpq's protocol trace of every connection of an engine, one file
    each: what each connection sent and received during a request."""

    def __init__(self, engine: sa.Engine) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="orderhooks-wire-"))
        self.traced: list[tuple[Any, Path]] = []
        self.engine = engine
        sa.event.listen(engine, "connect", self._trace)

    def close(self) -> None:
        sa.event.remove(self.engine, "connect", self._trace)
        self.engine.dispose()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _trace(self, dbapi_connection: Any, _record: Any) -> None:
        path = self.folder / f"{len(self.traced)}.txt"
        handle = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        dbapi_connection.pgconn.trace(handle)
        dbapi_connection.pgconn.set_trace_flags(_flags())
        self.traced.append((dbapi_connection, path))

    def mark(self) -> dict[Path, int]:
        """Where each trace ends now."""
        self._flush()
        return {path: path.stat().st_size for _, path in self.traced}

    def since(self, mark: dict[Path, int]) -> list[list[str]]:
        """Per connection that sent anything since ``mark``: its round trips,
        each the messages the client sent before the server's ReadyForQuery."""
        self._flush()
        connections = []
        for _, path in self.traced:
            text = path.read_text()
            # Statements prepared earlier are only named after their Parse.
            prepared: dict[str, str] = {}
            trips: list[str] = []
            sent: list[str] = []
            bound = ""
            for offset, line in _lines(text):
                direction, _length, message, *rest = [*line.split("\t"), "", "", ""]
                quoted = rest[0].split('"')
                if direction == "F" and message == "Parse":
                    prepared[quoted[1]] = quoted[3]
                elif direction == "F" and message == "Bind":
                    bound = prepared[quoted[3]]
                elif offset < mark.get(path, 0):
                    continue
                elif direction == "F" and message == "Execute":
                    sent.append(bound)
                elif direction == "F" and message == "Query":
                    sent.append(quoted[1])
                elif direction == "B" and message == "ReadyForQuery":
                    trips.append(" | ".join(_what(sql) for sql in sent))
                    sent = []
            if trips:
                connections.append(trips)
        return connections

    def _flush(self) -> None:
        # PQuntrace flushes libpq's buffered stream; trace again at once.
        for dbapi_connection, path in self.traced:
            if dbapi_connection.closed:
                continue
            dbapi_connection.pgconn.untrace()
            handle = os.open(path, os.O_WRONLY | os.O_APPEND)
            dbapi_connection.pgconn.trace(handle)
            dbapi_connection.pgconn.set_trace_flags(_flags())


def _flags() -> int:
    import psycopg

    return int(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Each line of a trace, with the offset it starts at."""
    offset = 0
    for line in text.splitlines(keepends=True):
        yield offset, line.rstrip("\n")
        offset += len(line.encode())


def _what(sql: str) -> str:
    """A statement in its first words: enough to say what it is."""
    words = sql.split(" ")
    if words[0] == "INSERT":
        return f"INSERT {words[2]}"
    if words[0] == "UPDATE" or words[:3] == ["COMMIT", "AND", "CHAIN"]:
        return " ".join(words[:2] if words[0] == "UPDATE" else words[:3])
    return words[0]


@pytest.fixture
def wired(recorder: RecorderFactory) -> Iterator[tuple[Flask, Recorder, Wire]]:
    app, rec = recorder()
    assert rec.db is not None
    with app.app_context():
        rec.db.engine.dispose()  # traced from their first connection on
        wire = Wire(rec.db.engine)
    yield app, rec, wire
    wire.close()


def _one_request(app: Flask, wire: Wire, cb: SignedCallback) -> tuple[int, list[list[str]]]:
    mark = wire.mark()
    answer = _post(app, cb)
    return answer.status_code, wire.since(mark)


def test_a_first_delivery_claims_and_marks_in_one_round_trip(
    wired: tuple[Flask, Recorder, Wire],
) -> None:
    """One connection: psycopg's BEGIN, then the pipeline (claim, its COMMIT
    AND CHAIN, the done mark, the state), the receiver's INSERT (flushed at
    commit), and the COMMIT of the done mark with it."""
    app, rec, wire = wired
    # Past psycopg's prepare threshold (5), as in steady traffic.
    for _ in range(6):
        assert _post(app, _callback(app)).status_code == 200
    status, connections = _one_request(app, wire, _callback(app))
    assert status == 200
    assert connections == [
        [
            "BEGIN",
            PIPELINE,
            "INSERT test_credits",
            "COMMIT",
        ]
    ]
    assert rec.credits() == 7


def test_a_duplicate_commits_its_read_only_transaction_never_rolls_back(
    wired: tuple[Flask, Recorder, Wire],
) -> None:
    """A ROLLBACK would make psycopg deallocate every prepared statement of
    the connection (the claim's among them, planned again on the next five
    deliveries): the duplicate's chained transaction only read, so it ends
    with a COMMIT, and nothing is dispatched again."""
    app, rec, wire = wired
    cbs = [_callback(app) for _ in range(6)]
    for cb in cbs:
        assert _post(app, cb).status_code == 200
    status, connections = _one_request(app, wire, cbs[0])
    assert status == 200
    assert connections == [
        [
            "BEGIN",
            PIPELINE,
            "COMMIT",
        ]
    ]
    assert len(rec.events) == 6


def test_a_write_the_host_flushed_before_the_view_is_not_committed_by_the_claim(
    recorder: RecorderFactory,
) -> None:
    """The session has sent a write: the claim must not chain on its
    connection (its COMMIT would commit the host's write). The claim goes
    alone; the host's write commits or rolls back with the dispatch."""
    app, rec = recorder()
    db = rec.db
    assert db is not None

    @app.before_request
    def write_first() -> None:
        db.session.add(Credit(key="before-the-view"))
        db.session.flush()

    rec.fail_next = 1
    cb = _callback(app)
    assert _post(app, cb).status_code == 500
    assert rec.credits() == 0  # the failed dispatch took the host's write back
    assert _post(app, cb).status_code == 200
    assert rec.credits() == 2  # the host's write and the receiver's, once
    assert len(rec.events) == 2


def test_a_failure_after_the_claim_committed_hands_the_claim_back(
    recorder: RecorderFactory, database_uri: str
) -> None:
    """The done mark fails in the pipeline after the claim's COMMIT AND CHAIN:
    503, and the claim is recorded as a failed attempt at once (not held
    until its lease runs out), so the platform's retry dispatches it."""
    app, rec = recorder()
    admin = sa.create_engine(database_uri)
    with admin.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_done() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'done refused on purpose'; END $$"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_done BEFORE UPDATE ON orderhooks_deliveries"
            " FOR EACH ROW WHEN (NEW.status = 'done') EXECUTE FUNCTION refuse_done()"
        )
    cb = _callback(app)
    try:
        answer = _post(app, cb)
        assert (answer.status_code, answer.text) == (503, "The store is unavailable.")
        assert rec.events == []
        with admin.connect() as connection:
            status, attempts, error = connection.execute(
                sa.text("SELECT status, attempts, error FROM orderhooks_deliveries")
            ).one()
        assert (status, attempts) == ("failed", 1)
        assert "done refused on purpose" in error
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER refuse_done ON orderhooks_deliveries")
            connection.exec_driver_sql("DROP FUNCTION refuse_done()")
        admin.dispose()
    assert _post(app, cb).status_code == 200
    assert len(rec.events) == 1
    assert rec.credits() == 1


def test_an_autocommit_host_engine_does_not_chain(recorder: RecorderFactory) -> None:
    """COMMIT AND CHAIN needs a transaction block: on a session in psycopg's
    autocommit mode the claim goes on its own connection, as before."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "AUTOCOMMIT"})
    cb = _callback(app)
    assert _post(app, cb).status_code == 200
    assert _post(app, cb).status_code == 200
    assert len(rec.events) == 1
    assert rec.credits() == 1
