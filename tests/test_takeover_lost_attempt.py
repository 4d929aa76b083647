"""A takeover of an abandoned attempt, on every backend where it applies.

- A processing row whose worker died (its lease ran out) taken over by a
  platform's resend or a replay (the request's claim), or made due again by
  a deferred resend, keeps the lost attempt as a worker's due claim does: its
  line in the history, its error, and the attempts count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from flask import Flask

from flask_orderhooks.replay import replay
from flask_orderhooks.store.statements import LEASE_LOST, lost_line_suffix
from flask_orderhooks.store.table import FailedAttempt, failure_line
from flask_orderhooks.testing import SignedCallback, igv_order_status
from tests.conftest import Recorder
from tests.test_history import (
    Clock,
    claim_and_die,
    clock,
    deferred,
    failing,
    hooks_of,
    inline,
    post,
    process_due,
    stored,
)

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

__all__ = ["clock"]  # the fixture, used by name

FIRST = "RuntimeError: first"


def _resend(app: Flask, cb: SignedCallback) -> None:
    assert post(app, cb) == 200


def _replay(app: Flask, cb: SignedCallback) -> None:
    with app.app_context():
        outcome = replay(app, hooks_of(app).state(app), stored(app, cb), force=False)
    assert outcome.status == "done", outcome


def _worker(app: Flask, cb: SignedCallback) -> None:
    assert process_due(app) == 1


def _lost_second_attempt(app: Flask, rec: Recorder, clock: Clock) -> SignedCallback:
    """A delivery whose first attempt failed (inline) and whose second one a
    worker claimed and then died on; its lease (30 s) has run out."""
    rec.hook = failing("first")
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == 500
    clock.now += 5
    assert claim_and_die(app) == 2
    clock.now += 31
    return cb


@pytest.mark.parametrize(
    "take_over", [_worker, _resend, _replay], ids=["worker", "resend", "replay"]
)
def test_a_lost_attempt_taken_over_is_kept_as_the_due_claim_keeps_it(
    recorder: RecorderFactory, clock: Clock, take_over: Callable[[Flask, SignedCallback], None]
) -> None:
    """Whoever takes the abandoned row over (a worker's due claim, a
    platform's resend, a replay) records the lost attempt 2 in the history
    and as the error, and makes attempt 3: the row ends the same."""
    app, rec = inline(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5, 5])
    cb = _lost_second_attempt(app, rec, clock)
    take_over(app, cb)
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("done", 3, LEASE_LOST)
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), FIRST),
        FailedAttempt(2, clock.at(36), LEASE_LOST),
    )
    assert len(rec.events) == 2


def test_a_resend_after_a_lost_attempt_that_fails_counts_toward_the_limit(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """Three attempts allowed: the first failed, the second was lost, and the
    resend's (the third) fails too: the delivery is dead, its history holding
    all three, and no worker tries again."""
    app, rec = inline(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5, 5])
    cb = _lost_second_attempt(app, rec, clock)
    rec.hook = failing("third")
    assert post(app, cb) == 500
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("dead", 3, "RuntimeError: third")
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), FIRST),
        FailedAttempt(2, clock.at(36), LEASE_LOST),
        FailedAttempt(3, clock.at(36), "RuntimeError: third"),
    )
    clock.now += 3600
    assert process_due(app) == 0


@pytest.mark.parametrize("outcome", ["done", "dead"])
def test_a_resend_still_dispatches_a_delivery_whose_last_attempt_was_lost(
    recorder: RecorderFactory, clock: Clock, outcome: str
) -> None:
    """Two attempts allowed, and the second (the last) was lost. A worker
    would bury it dead without dispatching (tests/test_delivery_queue.py);
    a platform's resend dispatches it, as it dispatches a dead delivery
    (docs/dispatch.rst), with the lost attempt recorded first. If that
    attempt fails too the delivery is dead again, with one line per attempt."""
    app, rec = inline(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5])
    cb = _lost_second_attempt(app, rec, clock)
    rec.hook = failing("third" if outcome == "dead" else None)
    assert post(app, cb) == (200 if outcome == "done" else 500)
    row = stored(app, cb)
    lost = (FailedAttempt(1, clock.at(0), FIRST), FailedAttempt(2, clock.at(36), LEASE_LOST))
    if outcome == "done":
        assert (row.status, row.attempts, row.error, row.failed_attempts) == (
            "done",
            3,
            LEASE_LOST,
            lost,
        )
    else:
        assert (row.status, row.attempts, row.error) == ("dead", 3, "RuntimeError: third")
        assert row.failed_attempts == (
            *lost,
            FailedAttempt(3, clock.at(36), "RuntimeError: third"),
        )
    assert len(rec.events) == 2


def test_a_deferred_resend_of_a_lost_attempt_keeps_it(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """Deferred dispatch: the resend makes the abandoned row due now
    (pending), so the worker that takes it next finds it pending, not
    processing; the resend records the lost attempt itself."""
    app, rec = deferred(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5])
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == 200
    assert claim_and_die(app) == 1
    clock.now += 31
    assert post(app, cb) == 200  # accepted again: due now
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("pending", 1, LEASE_LOST)
    assert row.failed_attempts == (FailedAttempt(1, clock.at(31), LEASE_LOST),)
    assert process_due(app) == 1
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("done", 2, LEASE_LOST)
    assert row.failed_attempts == (FailedAttempt(1, clock.at(31), LEASE_LOST),)
    assert len(rec.events) == 1


@pytest.mark.parametrize("dispatch", ["inline", "deferred"])
def test_a_resend_of_a_live_claim_records_no_lost_attempt(
    recorder: RecorderFactory, clock: Clock, dispatch: str
) -> None:
    """A resend while the lease still runs takes nothing over and records
    nothing: the history is only for attempts that were lost."""
    app, rec = (inline if dispatch == "inline" else deferred)(
        recorder,
        clock,
        ORDERHOOKS_CLAIM_TIMEOUT=30,
        ORDERHOOKS_RETRY_DELAYS=[5],
        ORDERHOOKS_DUPLICATE_WAIT=0.2,
    )
    rec.hook = failing("first")
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == (500 if dispatch == "inline" else 200)
    if dispatch == "deferred":
        assert process_due(app) == 1  # attempt 1 fails
    clock.now += 5
    assert claim_and_die(app) == 2
    clock.now += 29  # the lease has a second left
    assert post(app, cb) == (503 if dispatch == "inline" else 200)
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("processing", 2, FIRST)
    assert row.failed_attempts == (FailedAttempt(1, clock.at(0), FIRST),)


def test_a_takeover_run_once_more_records_the_lost_attempt_once(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """On MySQL a claim whose connection was lost runs once more, with the
    same token (``DeliveryStore._standing_alone``); if the first run's
    commit reached the server, the second finds the claim its own, live. It
    must not record a second lost attempt (on every backend the second run
    takes nothing over here; on MySQL it counts its attempt twice, as
    documented there)."""
    app, rec = inline(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5, 5])
    cb = _lost_second_attempt(app, rec, clock)
    with app.app_context():
        store = hooks_of(app).store
        delivery = (
            hooks_of(app)
            .state(app)
            .providers[cb.provider]
            .read(cb.callback, cb.body, cb.headers, now=None)
        )
        digest = hashlib.sha256(cb.body).hexdigest()
        for _ in range(2):
            store._claim_once(delivery, "t" * 32, digest, 1.0, force_over=None)
    row = stored(app, cb)
    assert (row.status, row.error) == ("processing", LEASE_LOST)
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), FIRST),
        FailedAttempt(2, clock.at(36), LEASE_LOST),
    )


@pytest.mark.parametrize(
    "at",
    [datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 7, 9, 23, 59, 59, 999_999, tzinfo=UTC)],
)
def test_the_lost_attempts_line_is_a_failed_attempts_line(at: datetime) -> None:
    """The SQL writes ``{"attempt": N`` and the store the rest: together the
    line any failed attempt gets (:func:`failure_line`)."""
    assert '{"attempt": 7' + lost_line_suffix(at) == failure_line(7, at, LEASE_LOST)
