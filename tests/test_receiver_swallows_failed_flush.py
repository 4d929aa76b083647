"""A receiver that catches the error of a failed flush (an IntegrityError,
"already credited") leaves db.session in a state where it can only be rolled
back: the attempt is a failed one, recorded, answered 500 and retried."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import sqlalchemy as sa
from flask import Flask

from tests.conftest import Credit, Recorder
from tests.test_durability import make, post, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]


def test_a_receiver_that_swallows_a_failed_flush_fails_the_attempt(
    recorder: RecorderFactory,
) -> None:
    app, rec = recorder()
    assert rec.db is not None
    db = rec.db
    with app.app_context():
        db.session.add(Credit(key="taken"))
        db.session.commit()
    first = [True]

    def swallow(_event: object) -> None:
        if first[0]:
            first[0] = False
            db.session.add(Credit(key="taken"))
            with contextlib.suppress(sa.exc.IntegrityError):
                db.session.flush()

    rec.hook = swallow
    cb = make("igv", app)
    response = post(app, cb)
    assert (response.status_code, response.get_data(as_text=True)) == (
        500,
        "A receiver failed; the delivery will be retried.",
    )
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("failed", 1)
    assert (row.error or "").startswith("AbortedTransaction: a receiver's flush"), row.error
    assert post(app, cb).status_code == 200
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)
    # The row taken beforehand, and the retry's credit.
    assert rec.credits() == 2
