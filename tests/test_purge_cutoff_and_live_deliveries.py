"""Purge: a naive cutoff is UTC, and a delivery the workers still carry is never deleted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flask_orderhooks.worker import attempt
from tests.conftest import AppFactory, session_not_in_utc, store_done_igv
from tests.test_cli import RecorderFactory, run
from tests.test_delivery_queue import Clock, deferred
from tests.test_durability import make, post, rows


@pytest.mark.parametrize("compact", [False, True], ids=["delete", "compact"])
def test_purge_reads_a_naive_cutoff_as_utc_whatever_the_session_time_zone(
    make_app: AppFactory, backend: str, compact: bool
) -> None:
    """The store keeps UTC, and reads naive times it gets back as UTC; a naive
    ``older_than`` is UTC too, on every backend."""
    app, hooks, _db = make_app(SQLALCHEMY_ENGINE_OPTIONS=session_not_in_utc(backend))
    store = hooks.state(app).store
    now = datetime.now(UTC)
    with app.app_context():
        store_done_igv(store, {"done-30-minutes-ago": now - timedelta(minutes=30)})
        cutoff = (now - timedelta(hours=1)).replace(tzinfo=None)
        if compact:
            assert store.compact(older_than=cutoff) == 0
        else:
            assert store.purge(older_than=cutoff) == 0
        (row,) = store.list()
        assert (row.key, row.body, row.compacted_at) == ("done-30-minutes-ago", b"{}", None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_purge_processing_spares_a_delivery_whose_worker_holds_its_lease(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """``purge --older-than 0s --processing`` between a worker's claim and its
    done mark (the dispatch waiting for a pooled connection, say): the
    platform was answered at the acceptance and sends it no more, so a
    deleted row is a lost callback. Only a processing delivery whose lease
    ran out (its worker died or hung) is deleted."""
    app, rec = deferred(recorder, clock)
    callback = make("collect", app, id="C-in-flight")
    assert post(app, callback).status_code == 200
    state = app.extensions["orderhooks"].state(app)
    with app.app_context():
        due = state.store.claim_due()
    assert due is not None
    clock.now += 1
    result = run(app, "purge", "--older-than", "0s", "--processing")
    assert result.output.splitlines()[0] == (
        "Deleted 0 and compacted 0 deliveries older than 0s (done, processing)."
    )
    with app.app_context():
        assert attempt(app, state, due)
    assert [name for name, _event in rec.events] == ["PaymentCollected"]
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)

    # A worker that died: its lease runs out, and the row is deleted (the
    # done one, the gateway's, is compacted).
    other = make("collect", app, id="C-abandoned")
    assert post(app, other).status_code == 200
    with app.app_context():
        assert state.store.claim_due() is not None
    clock.now += state.store.claim_timeout + 1
    result = run(app, "purge", "--older-than", "0s", "--processing")
    assert result.output.splitlines()[0] == (
        "Deleted 1 and compacted 1 deliveries older than 0s (done, processing)."
    )
    assert [(r.key, r.status, r.compacted_at is not None) for r in rows(app)] == [
        ("C-in-flight:60", "done", True)
    ]


def test_purge_failed_spares_a_delivery_whose_next_attempt_is_scheduled(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """``purge --older-than 1m --failed`` with retry delays longer than the
    age: a failed delivery still has its next attempt on the schedule (a
    deferred one was answered at its acceptance, an inline one's platform
    may have stopped resending), so deleting it loses a callback the
    workers would still carry to done. Only a failed delivery whose next
    attempt is due, or none is set, is deleted; dead ones go as before."""
    app, rec = deferred(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[3600])
    state = app.extensions["orderhooks"].state(app)
    callback = make("collect", app, id="C-retry-scheduled")
    assert post(app, callback).status_code == 200
    rec.fail_next = 1
    with app.app_context():
        due = state.store.claim_due()
        assert due is not None
        assert not attempt(app, state, due)
    (row,) = rows(app)
    assert (row.status, row.next_attempt_at) == ("failed", clock.at(3600))
    clock.now += 120
    result = run(app, "purge", "--older-than", "1m", "--failed")
    assert result.output.splitlines()[0] == (
        "Deleted 0 and compacted 0 deliveries older than 1m (done, failed, dead)."
    )
    (row,) = rows(app)
    assert row.status == "failed"

    # Due for 30 s: a worker may be about to take it (between its polls,
    # or behind); --older-than 1m keeps it.
    clock.now += 3510
    result = run(app, "purge", "--older-than", "1m", "--failed")
    assert result.output.splitlines()[0] == (
        "Deleted 0 and compacted 0 deliveries older than 1m (done, failed, dead)."
    )
    assert [row.status for row in rows(app)] == ["failed"]

    # Due for longer than AGE and no worker took it: the operator's
    # --failed deletes it, as it always did.
    clock.now += 90
    result = run(app, "purge", "--older-than", "1m", "--failed")
    assert result.output.splitlines()[0] == (
        "Deleted 1 and compacted 0 deliveries older than 1m (done, failed, dead)."
    )
    assert rows(app) == []
