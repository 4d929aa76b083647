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
