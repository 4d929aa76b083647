"""A forced replay reads a done delivery, and purge changes it before the
replay's claim: the claim must see that the row is not the one read.

Purge deletes the row (a done iGV or SUD delivery past its window): a
forced replay then stores the delivery anew, at attempt 1, and dispatches
it, which is the one dispatch asked for; a second forced replay of the same
read (a double submit, another operator) found a done row at the attempts
it had read, took it over and dispatched once more. Purge compacts the row
(a gateway delivery): the forced claim took the tombstone over, and a
failed attempt left a failed delivery with no body to retry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask_orderhooks.replay import replay
from tests.test_cli import RecorderFactory
from tests.test_durability import make, post, rows


def test_a_forced_replay_of_a_delivery_purged_since_it_was_read_dispatches_once(
    recorder: RecorderFactory,
) -> None:
    app, rec = recorder()
    assert post(app, make("igv", app)).status_code == 200
    (seen,) = rows(app)
    state = app.extensions["orderhooks"].state(app)
    with app.app_context():
        assert state.store.purge(older_than=datetime.now(UTC) + timedelta(hours=1)) == 1
        first = replay(app, state, seen, force=True)
        second = replay(app, state, seen, force=True)
    assert (first.status, first.attempt) == ("done", 1)
    assert second.status == "already_done", second.message
    assert rec.credits() == 2
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)


def test_a_forced_replay_of_a_delivery_compacted_since_it_was_read_is_refused(
    recorder: RecorderFactory,
) -> None:
    app, rec = recorder()
    assert post(app, make("collect", app)).status_code == 200
    (seen,) = rows(app)
    state = app.extensions["orderhooks"].state(app)
    with app.app_context():
        assert state.store.compact(older_than=datetime.now(UTC) + timedelta(hours=1)) == 1
        outcome = replay(app, state, seen, force=True)
    assert outcome.status == "failed"
    assert "compacted by purge at " in outcome.message
    assert outcome.message.endswith(": its body is gone; not replayed.")
    assert rec.credits() == 1
    (row,) = rows(app)
    assert (row.status, row.attempts, row.body) == ("done", 1, b"")
    assert row.compacted_at is not None
