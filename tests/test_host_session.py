"""The host's db.session may have begun its transaction before the callback
view runs (a before_request hook that reads), at any isolation level."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks.testing import build
from tests.conftest import Credit, Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

LEVELS = [
    ("sqlite", "SERIALIZABLE"),
    *(
        pytest.param("postgresql", level, marks=pytest.mark.postgres)
        for level in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
    ),
    *(
        pytest.param("mariadb", level, marks=pytest.mark.mariadb)
        for level in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
    ),
]


@pytest.mark.parametrize(("backend", "level"), LEVELS)
def test_a_session_begun_before_the_view_still_dispatches_once(
    recorder: RecorderFactory, level: str
) -> None:
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": level})
    db = rec.db
    assert db is not None

    @app.before_request
    def read_something() -> None:
        # Takes the transaction's snapshot before the claim is committed.
        db.session.scalar(sa.select(sa.func.count()).select_from(Credit))

    with app.app_context():
        cb = build("igv", app=app)
    client = app.test_client()
    first = client.post(cb.url(), data=cb.body, headers=cb.headers)
    retry = client.post(cb.url(), data=cb.body, headers=cb.headers)
    assert (first.status_code, retry.status_code) == (200, 200), first.text
    assert len(rec.events) == 1
    assert rec.credits() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_snapshot_session_that_wrote_before_the_view_is_refused_clearly(
    recorder: RecorderFactory, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Committing or rolling back the host's own writes would change them: the
    delivery is refused (retry), kept as failed, and the log says why."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": level})
    db = rec.db
    assert db is not None

    @app.before_request
    def write_something() -> None:
        db.session.add(Credit(key="written before the view"))
        db.session.flush()

    with app.app_context():
        cb = build("igv", app=app)
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert response.status_code == 503
    assert response.text == (
        f"The app's database session began a {level.lower()} transaction before this "
        "callback; the delivery was kept for retry."
    )
    assert rec.events == []
    assert rec.credits() == 0
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.list()
    assert (row.status, row.attempts) == ("failed", 1)
    assert f"db.session began a {level} transaction and wrote before the callback" in caplog.text


@pytest.mark.mariadb
@pytest.mark.parametrize("backend", ["mariadb"])
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_mysql_needs_no_stale_snapshot_rule(recorder: RecorderFactory, level: str) -> None:
    """InnoDB's UPDATE acts on the latest committed row whatever the
    transaction's snapshot, so the done mark finds the claim even when the
    host's session wrote before the view at REPEATABLE READ: unlike
    PostgreSQL, nothing is refused, and the host's write commits with it."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": level})
    db = rec.db
    assert db is not None

    @app.before_request
    def write_something() -> None:
        db.session.add(Credit(key="written before the view"))
        db.session.flush()

    with app.app_context():
        cb = build("igv", app=app)
    client = app.test_client()
    first = client.post(cb.url(), data=cb.body, headers=cb.headers)
    assert first.status_code == 200, first.text
    assert len(rec.events) == 1
    # The hook's row and the receiver's row, committed with the done mark.
    assert rec.credits() == 2
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.list()
    assert (row.status, row.attempts) == ("done", 1)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_a_write_the_host_flushed_before_the_view_is_not_committed_by_the_claim(
    recorder: RecorderFactory,
) -> None:
    """The session has sent a write before the view: the claim's commit must
    not take it along (on the session's connection, it would). The host's
    write commits or rolls back with the dispatch."""
    app, rec = recorder()
    db = rec.db
    assert db is not None

    @app.before_request
    def write_first() -> None:
        db.session.add(Credit(key="before-the-view"))
        db.session.flush()

    rec.fail_next = 1
    with app.app_context():
        cb = build("igv", app=app)
    client = app.test_client()
    assert client.post(cb.url(), data=cb.body, headers=cb.headers).status_code == 500
    assert rec.credits() == 0  # the failed dispatch took the host's write back
    assert client.post(cb.url(), data=cb.body, headers=cb.headers).status_code == 200
    assert rec.credits() == 2  # the host's write and the receiver's, once
    assert len(rec.events) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_autocommit_host_engine_dispatches_once(recorder: RecorderFactory) -> None:
    """A host whose engine is in autocommit mode: no transaction block for
    the store to rely on on its connection (COMMIT AND CHAIN, tried on
    PostgreSQL, fails there), and the delivery is still dispatched once."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "AUTOCOMMIT"})
    with app.app_context():
        cb = build("igv", app=app)
    client = app.test_client()
    assert client.post(cb.url(), data=cb.body, headers=cb.headers).status_code == 200
    assert client.post(cb.url(), data=cb.body, headers=cb.headers).status_code == 200
    assert len(rec.events) == 1
    assert rec.credits() == 1


def _fails_then_dispatches_once(app: Flask, rec: Recorder) -> None:
    """The first attempt's receiver raises: a 500, the delivery kept failed
    (not done), and the retry dispatches it."""
    rec.fail_next = 1
    with app.app_context():
        cb = build("igv", app=app)
    client = app.test_client()
    first = client.post(cb.url(), data=cb.body, headers=cb.headers)
    assert first.status_code == 500, first.text
    with app.app_context():
        (row,) = app.extensions["orderhooks"].store.list()
    assert row.status == "failed", "the failed attempt left the delivery done"
    retry = client.post(cb.url(), data=cb.body, headers=cb.headers)
    assert retry.status_code == 200
    assert len(rec.events) == 2, "the retry was answered as a duplicate: the delivery is lost"


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
@pytest.mark.parametrize("host_db", [True, False], ids=["host-engine", "own-store-engine"])
def test_an_autocommit_engine_does_not_commit_the_done_mark_before_the_receivers(
    recorder: RecorderFactory, host_db: bool
) -> None:
    """With the host's engine (``SQLALCHEMY_ENGINE_OPTIONS``) or the own
    store's (``OrderHooks(app, engine_options=...)``) in autocommit mode,
    the done mark must not be committed on its own before the receivers
    run: a receiver that raises would leave the delivery done (its failure
    record is fenced by ``status <> 'done'``), the platform's retry would be
    answered as a duplicate, and the receiver's work would never happen."""
    autocommit = {"isolation_level": "AUTOCOMMIT"}
    if host_db:
        app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS=autocommit)
    else:
        app, rec = recorder(host_db=False, hooks_options={"engine_options": autocommit})
    _fails_then_dispatches_once(app, rec)


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
@pytest.mark.parametrize("unflushed", [False, True])
def test_an_autocommit_session_begun_before_the_view(
    recorder: RecorderFactory, unflushed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The host's autocommit session read before the view: what it ran is
    committed already, so the dispatch begins again on a connection with a
    real transaction. Unflushed objects would be dropped by that: the
    delivery is refused (503, kept for the retry) and the log says why."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "AUTOCOMMIT"})
    db = rec.db
    assert db is not None

    @app.before_request
    def read_something() -> None:
        db.session.scalar(sa.select(sa.func.count()).select_from(Credit))
        if unflushed:
            db.session.add(Credit(key="added before the view"))

    if not unflushed:
        # The receiver's failure rolled the done mark back with it.
        _fails_then_dispatches_once(app, rec)
        assert rec.credits() == 1
        return
    with app.app_context():
        cb = build("igv", app=app)
    first = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    assert first.status_code == 503, first.text
    assert "autocommit mode with changes from before this callback" in first.text
    assert "AUTOCOMMIT mode and the session has unflushed changes" in caplog.text
    assert rec.events == []


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_snapshot_session_with_pending_objects_is_not_silently_rolled_back(
    recorder: RecorderFactory, level: str
) -> None:
    """A before_request hook that read (the transaction has begun, nothing
    flushed) and added an object it has not flushed yet. At READ COMMITTED
    the object commits with the delivery; at REPEATABLE READ the store rolls
    the "read-only" transaction back to refresh its snapshot, and
    Session.rollback() expunges the pending object: the host's write is
    dropped without a word while the delivery is answered done. Either it
    commits with the delivery, or the delivery is refused (StaleSnapshot)."""
    app, rec = recorder(SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": level})
    db = rec.db
    assert db is not None

    @app.before_request
    def read_then_add() -> None:
        db.session.scalar(sa.select(sa.func.count()).select_from(Credit))
        db.session.add(Credit(key="audit: added before the view"))

    with app.app_context():
        cb = build("igv", app=app)
    response = app.test_client().post(cb.url(), data=cb.body, headers=cb.headers)
    with app.app_context():
        audit = db.session.scalar(
            sa.select(sa.func.count()).where(Credit.key == "audit: added before the view")
        )
    if response.status_code == 200:
        assert len(rec.events) == 1
        assert audit == 1, "the host's pending object was rolled back, and the delivery is done"
    else:
        assert response.status_code == 503
        assert rec.events == []
