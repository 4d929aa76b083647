"""0.3's columns on every backend: the order id a delivery names
(``StoredDelivery.reference``) and the history of its failed attempts
(``StoredDelivery.failed_attempts``), through the real routes and workers,
with an injected clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_orderhooks import OrderHooks
from flask_orderhooks.replay import replay
from flask_orderhooks.store import DeliveryStore, StoredDelivery
from flask_orderhooks.store.statements import LEASE_LOST
from flask_orderhooks.store.table import REFERENCE, FailedAttempt, failure_line, parse_failures
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order,
    sud_order_batch_changed,
    sud_order_changed,
)
from tests.conftest import Recorder

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

T0 = 1_795_000_000.0
EXPLODED = "RuntimeError: receiver exploded on purpose"


class Clock:
    """The extension's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(T0 + seconds, UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def hooks_of(app: Flask) -> OrderHooks:
    hooks: OrderHooks = app.extensions["orderhooks"]
    return hooks


def store_of(app: Flask) -> DeliveryStore:
    with app.app_context():
        store = hooks_of(app).store
        store.engine  # noqa: B018 - resolved inside the app context
        return store


def post(app: Flask, cb: SignedCallback) -> int:
    return app.test_client().post(cb.url(), data=cb.body, headers=cb.headers).status_code


def stored(app: Flask, cb: SignedCallback) -> StoredDelivery:
    with app.app_context():
        (row,) = hooks_of(app).store.get(cb.key)
    return row


def process_due(app: Flask) -> int:
    with app.app_context():
        return hooks_of(app).process_due()


def claim_and_die(app: Flask) -> int:
    """A worker claims the delivery due soonest, then dies before dispatching it."""
    with app.app_context():
        due = hooks_of(app).store.claim_due()
    assert due is not None and not due.lease_lost
    return due.claim.attempt


def failing(*errors: str | None) -> Callable[[Any], None]:
    """A receiver hook raising ``RuntimeError(errors[n])`` on its n-th call
    (``None``: that call succeeds; past the end: every call succeeds)."""
    calls = iter(errors)

    def hook(_event: Any) -> None:
        error = next(calls, None)
        if error is not None:
            raise RuntimeError(error)

    return hook


def inline(recorder: RecorderFactory, clock: Clock, **config: Any) -> tuple[Flask, Recorder]:
    return recorder(
        hooks_options={"clock": clock},
        ORDERHOOKS_IGV_MAX_AGE=None,
        ORDERHOOKS_SUD_MAX_AGE=None,
        **config,
    )


def deferred(recorder: RecorderFactory, clock: Clock, **config: Any) -> tuple[Flask, Recorder]:
    return inline(recorder, clock, ORDERHOOKS_DISPATCH="deferred", **config)


# -- reference ----------------------------------------------------------------------

#: name -> (builder of the signed callback for an app, the reference it must store).
REFERENCES: dict[str, tuple[Callable[[Flask], SignedCallback], str | None]] = {
    "igv": (lambda app: igv_order_status(order_id=1689644928115784, app=app), "1689644928115784"),
    # Any status names the order, not only Pending Delivery (1).
    "igv-other-status": (
        lambda app: igv_order_status(order_id=42, seller_order_status=3, app=app),
        "42",
    ),
    "collect": (lambda app: gateway_collect(trans_id="ORDER-7781", app=app), "ORDER-7781"),
    "payout": (lambda app: gateway_payout(trans_id="WDL-0042", app=app), "WDL-0042"),
    "sud": (lambda app: sud_order_changed(out_order_id="OUT-ab-1", app=app), "OUT-ab-1"),
    # A batch's first order.
    "sud-batch": (
        lambda app: sud_order_batch_changed(
            orders=[sud_order(out_order_id="FIRST-1"), sud_order(out_order_id="SECOND-2")],
            app=app,
        ),
        "FIRST-1",
    ),
    # An event the extension does not handle names no order it knows.
    "sud-unhandled": (
        lambda app: sud_order_changed(
            out_order_id="OUT-IGNORED", extra={"notify_event": "room.closed"}, app=app
        ),
        None,
    ),
    # The longest kept: 191 characters, four-byte ones included.
    "longest": (
        lambda app: gateway_collect(trans_id="\U0001f600" + "R" * 190, app=app),
        "\U0001f600" + "R" * 190,
    ),
    # One more is too long to search by: not stored, and never cut.
    "too-long": (lambda app: gateway_collect(trans_id="R" * 192, app=app), None),
}


@pytest.mark.parametrize("dispatch", ["inline", "deferred"])
@pytest.mark.parametrize("case", list(REFERENCES))
def test_the_reference_is_the_order_id_the_body_names(
    recorder: RecorderFactory, clock: Clock, case: str, dispatch: str
) -> None:
    app, rec = inline(recorder, clock, ORDERHOOKS_DISPATCH=dispatch)
    build, reference = REFERENCES[case]
    with app.app_context():
        cb = build(app)
    assert post(app, cb) == 200
    if dispatch == "deferred":
        assert stored(app, cb).reference == reference, "stored with the acceptance"
        assert process_due(app) == 1
    assert len(rec.events) == (2 if case == "sud-batch" else 1)
    row = stored(app, cb)
    assert (row.status, row.reference, row.failed_attempts) == ("done", reference, ())


def stored_with_reference(app: Flask, reference: str) -> list[str]:
    """The keys whose stored reference equals ``reference`` (the console's search)."""
    store = store_of(app)
    t = store.table
    with store.engine.connect() as connection:
        found = connection.execute(
            sa.select(t.c.key)
            .where(t.c.reference == sa.bindparam("q", reference, type_=REFERENCE))
            .order_by(t.c.key)
        ).all()
    return [key for (key,) in found]


def test_a_reference_is_compared_case_sensitively(recorder: RecorderFactory, clock: Clock) -> None:
    """MySQL's default collation would find 'order-1' for 'ORDER-1' too."""
    app, _rec = inline(recorder, clock)
    sent = {}
    for trans_id in ("ORDER-1", "order-1", "Order-1"):
        with app.app_context():
            cb = gateway_collect(trans_id=trans_id, app=app)
        assert post(app, cb) == 200
        sent[trans_id] = cb.key
    assert {trans_id: stored_with_reference(app, trans_id) for trans_id in sent} == {
        trans_id: [key] for trans_id, key in sent.items()
    }


def test_a_reference_is_compared_with_its_trailing_spaces(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """``exact_string`` promises byte-for-byte comparison; MariaDB's
    utf8mb4_bin is a PAD SPACE collation ('ORDER-1' = 'ORDER-1 '), which is
    why the key is a VARBINARY."""
    app, _rec = inline(recorder, clock)
    sent = {}
    for trans_id in ("ORDER-1", "ORDER-1 "):
        with app.app_context():
            cb = gateway_collect(trans_id=trans_id, app=app)
        assert post(app, cb) == 200
        sent[trans_id] = cb.key
    assert {trans_id: stored_with_reference(app, trans_id) for trans_id in sent} == {
        trans_id: [key] for trans_id, key in sent.items()
    }


# -- failed attempts ------------------------------------------------------------------


def test_inline_failures_and_the_platforms_retry_each_add_a_line(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = inline(recorder, clock)
    rec.hook = failing("ledger down", "ledger still down")
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == 500
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("failed", 1, "RuntimeError: ledger down")
    assert row.failed_attempts == (FailedAttempt(1, clock.at(0), "RuntimeError: ledger down"),)

    clock.now += 7.25  # the platform's retry, by the app's clock
    assert post(app, cb) == 500
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == (
        "failed",
        2,
        "RuntimeError: ledger still down",
    )
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: ledger down"),
        FailedAttempt(2, clock.at(7.25), "RuntimeError: ledger still down"),
    )

    clock.now += 60
    assert post(app, cb) == 200
    row = stored(app, cb)
    assert (row.status, row.attempts) == ("done", 3)
    assert row.error == "RuntimeError: ledger still down", "the last error is kept"
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: ledger down"),
        FailedAttempt(2, clock.at(7.25), "RuntimeError: ledger still down"),
    ), "a done delivery keeps its history"
    assert len(rec.events) == 3


def test_deferred_attempts_failing_until_dead_each_add_a_line(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[5, 60])
    rec.hook = failing("first", "second", "third", "never reached")
    with app.app_context():
        cb = gateway_payout(trans_id="WDL-9", app=app)
    assert post(app, cb) == 200
    assert stored(app, cb).failed_attempts == ()
    assert process_due(app) == 1
    clock.now += 5
    assert process_due(app) == 1
    clock.now += 60
    assert process_due(app) == 1
    clock.now += 10**6
    assert process_due(app) == 0
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error, row.next_attempt_at, row.reference) == (
        "dead",
        3,
        "RuntimeError: third",
        None,
        "WDL-9",
    )
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: first"),
        FailedAttempt(2, clock.at(5), "RuntimeError: second"),
        FailedAttempt(3, clock.at(65), "RuntimeError: third"),
    )
    assert len(rec.events) == 3


def test_a_lost_lease_adds_a_line_for_the_lost_attempt(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(
        recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5, 5]
    )
    rec.hook = failing("after the takeover")
    with app.app_context():
        cb = sud_order_changed(out_order_id="OUT-LEASE", app=app)
    assert post(app, cb) == 200
    assert claim_and_die(app) == 1
    clock.now += 31
    assert process_due(app) == 1  # takes the lost attempt over: attempt 2, which fails
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == (
        "failed",
        2,
        "RuntimeError: after the takeover",
    )
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(31), LEASE_LOST),
        FailedAttempt(2, clock.at(31), "RuntimeError: after the takeover"),
    )
    clock.now += 5
    assert process_due(app) == 1
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("done", 3, "RuntimeError: after the takeover")
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(31), LEASE_LOST),
        FailedAttempt(2, clock.at(31), "RuntimeError: after the takeover"),
    ), "a done delivery keeps its history"
    assert len(rec.events) == 2


def test_a_lease_lost_after_a_failure_names_that_later_attempt(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """The line's number is the attempt count before the takeover's claim
    (MySQL's UPDATE assigns left to right: the history before ``attempts``)."""
    app, rec = deferred(
        recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5, 5, 5]
    )
    rec.hook = failing("first")
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == 200
    assert process_due(app) == 1  # attempt 1 fails
    clock.now += 5
    assert claim_and_die(app) == 2
    clock.now += 31
    assert process_due(app) == 1  # attempt 3 takes over, and succeeds
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("done", 3, LEASE_LOST)
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: first"),
        FailedAttempt(2, clock.at(36), LEASE_LOST),
    )
    assert len(rec.events) == 2


def test_a_lost_last_attempt_adds_one_line(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[])
    with app.app_context():
        cb = igv_order_status(app=app)
    assert post(app, cb) == 200
    assert claim_and_die(app) == 1
    clock.now += 31
    assert process_due(app) == 1
    assert rec.events == []
    row = stored(app, cb)
    assert row.failed_attempts == (FailedAttempt(1, clock.at(31), LEASE_LOST),), (
        "one line per failed attempt"
    )
    assert (row.status, row.error) == ("dead", LEASE_LOST)


def test_a_failing_replay_adds_a_line(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = inline(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[])
    rec.hook = failing("first", "replayed")
    with app.app_context():
        cb = gateway_collect(app=app)
    assert post(app, cb) == 500
    clock.now += 3600
    with app.app_context():
        outcome = replay(app, hooks_of(app).state(app), stored(app, cb), force=False)
    assert (outcome.status, outcome.attempt) == ("failed", None)
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("dead", 2, "RuntimeError: replayed")
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: first"),
        FailedAttempt(2, clock.at(3600), "RuntimeError: replayed"),
    )


def set_failures(app: Flask, cb: SignedCallback, text: str) -> None:
    """Write a row's history directly, as an operator's hand or an old tool might."""
    store = store_of(app)
    t = store.table
    with store.engine.begin() as connection:
        updated = connection.execute(
            sa.update(t)
            .where(t.c.provider == cb.provider, t.c.callback == cb.callback, t.c.key == cb.key)
            .values(failures=text)
        ).rowcount
    assert updated == 1


def test_a_line_that_does_not_parse_hides_no_other(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = inline(recorder, clock)
    rec.hook = failing("first", "second")
    with app.app_context():
        cb = gateway_collect(app=app)
    assert post(app, cb) == 500
    (first,) = stored(app, cb).failed_attempts
    assert first == FailedAttempt(1, clock.at(0), "RuntimeError: first")
    cut = failure_line(1, clock.at(0), "RuntimeError: first")
    set_failures(
        app,
        cb,
        cut
        + cut[:25]  # cut by hand, without its newline
        + "\nnot json at all\n"
        + '{"attempt": 9, "error": "no time"}\n'
        + '{"attempt": "x", "at": "2026-01-01T00:00:00+00:00", "error": "e"}\n'
        + '{"attempt": 7, "at": "yesterday", "error": "e"}\n'
        + "[1, 2]\n",
    )
    clock.now += 2
    assert post(app, cb) == 500  # the platform's retry fails too: its line is appended
    row = stored(app, cb)
    assert row.failed_attempts == (
        FailedAttempt(1, clock.at(0), "RuntimeError: first"),
        FailedAttempt(2, clock.at(2), "RuntimeError: second"),
    )


def test_parse_failures_skips_each_bad_line() -> None:
    at = datetime(2026, 5, 4, 10, 0, 0, 123456, tzinfo=UTC)
    text = (
        failure_line(1, at, "RuntimeError: a")
        + "{broken\n"
        + "\n"
        + '{"attempt": 2, "at": "2026-05-04T10:00:01", "error": "naive time is UTC"}\n'
        + '{"attempt": 3, "at": null, "error": "e"}\n'
        + "null\n"
        + failure_line(4, at, "LeaseExpired: x")
    )
    assert parse_failures(text) == (
        FailedAttempt(1, at, "RuntimeError: a"),
        FailedAttempt(2, datetime(2026, 5, 4, 10, 0, 1, tzinfo=UTC), "naive time is UTC"),
        FailedAttempt(4, at, "LeaseExpired: x"),
    )
    assert parse_failures(None) == ()
    assert parse_failures("") == ()


def test_a_history_past_64_kib_still_records(recorder: RecorderFactory, clock: Clock) -> None:
    """MySQL's TEXT stops at 65,535 bytes; in strict mode the failure record
    would then be refused (the delivery left processing)."""
    app, rec = inline(recorder, clock)
    rec.hook = failing("first", "the last one")
    with app.app_context():
        cb = gateway_collect(app=app)
    assert post(app, cb) == 500
    long_error = "RuntimeError: " + "é" * 1000  # two bytes each in UTF-8
    old = [FailedAttempt(n, clock.at(n), long_error) for n in range(1, 41)]
    text = "".join(failure_line(a.attempt, a.at, a.error) for a in old)
    assert len(text.encode("utf-8")) > 65_535
    set_failures(app, cb, text)
    clock.now += 100
    assert post(app, cb) == 500
    row = stored(app, cb)
    assert (row.status, row.attempts, row.error) == ("failed", 2, "RuntimeError: the last one")
    assert row.failed_attempts == (
        *old,
        FailedAttempt(2, clock.at(100), "RuntimeError: the last one"),
    )


def test_many_failing_replays_pass_64_kib(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = inline(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[])
    long_error = "x" * 1900  # kept whole: under MAX_ERROR_LENGTH
    replays = 40
    rec.hook = failing(*[long_error] * (1 + replays))
    with app.app_context():
        cb = gateway_collect(app=app)
    assert post(app, cb) == 500
    with app.app_context():
        state = hooks_of(app).state(app)
        for n in range(replays):
            clock.now += 1
            outcome = replay(app, state, state.store.get(cb.key)[0], force=False)
            assert outcome.status == "failed", n
    row = stored(app, cb)
    assert (row.status, row.attempts) == ("dead", 1 + replays)
    assert row.failed_attempts == tuple(
        FailedAttempt(n, clock.at(n - 1), f"RuntimeError: {long_error}")
        for n in range(1, replays + 2)
    )
    text = "".join(failure_line(a.attempt, a.at, a.error) for a in row.failed_attempts)
    assert len(text.encode("utf-8")) > 65_535
