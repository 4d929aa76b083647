"""The delivery queue: deferred dispatch, local retries, dead deliveries and
workers, on SQLite and on PostgreSQL, with an injected clock."""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, has_app_context, has_request_context

from flask_orderhooks import (
    ConfigurationError,
    OrderHooks,
    delivery_dead,
    delivery_failed,
    order_pending_delivery,
)
from flask_orderhooks.cli import orderhooks
from flask_orderhooks.events import OrderPendingDelivery, PaymentCollected
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.store.statements import LEASE_LOST
from flask_orderhooks.worker import Worker
from tests.conftest import BASE_CONFIG, Credit, Recorder
from tests.test_durability import make, post, read, rows

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

T0 = 1_795_000_000.0


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


class OperatorSignals:
    """Records delivery_failed and delivery_dead for one app."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.failed: list[tuple[StoredDelivery, str, datetime | None]] = []
        self.dead: list[tuple[StoredDelivery, str]] = []

    def on_failed(
        self,
        sender: Flask,
        *,
        delivery: StoredDelivery,
        error: str,
        next_attempt_at: datetime | None,
    ) -> None:
        assert sender is self.app
        self.failed.append((delivery, error, next_attempt_at))

    def on_dead(self, sender: Flask, *, delivery: StoredDelivery, error: str) -> None:
        assert sender is self.app
        self.dead.append((delivery, error))


@pytest.fixture
def operator() -> Iterator[Callable[[Flask], OperatorSignals]]:
    connected: list[OperatorSignals] = []

    def connect(app: Flask) -> OperatorSignals:
        signals = OperatorSignals(app)
        delivery_failed.connect(signals.on_failed, app, weak=False)
        delivery_dead.connect(signals.on_dead, app, weak=False)
        connected.append(signals)
        return signals

    yield connect
    for signals in connected:
        delivery_failed.disconnect(signals.on_failed, signals.app)
        delivery_dead.disconnect(signals.on_dead, signals.app)


def process_due(app: Flask, limit: int | None = None) -> int:
    with app.app_context():
        hooks: OrderHooks = app.extensions["orderhooks"]
        return hooks.process_due(limit)


def deferred(recorder: RecorderFactory, clock: Clock, **config: Any) -> tuple[Flask, Recorder]:
    return recorder(
        hooks_options={"clock": clock},
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_IGV_MAX_AGE=None,
        ORDERHOOKS_SUD_MAX_AGE=None,
        **config,
    )


# -- deferred dispatch ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["igv", "collect", "payout", "sud", "sud-batch"])
def test_deferred_answers_at_once_and_a_worker_dispatches_once(
    recorder: RecorderFactory, clock: Clock, kind: str
) -> None:
    app, rec = deferred(recorder, clock)
    cb = make(kind, app)
    first = post(app, cb)
    assert first.status_code == 200
    assert rec.events == []
    (row,) = rows(app)
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 0, clock.at(0))
    # A platform's resend while it waits is a duplicate: answered, not stored twice.
    assert post(app, cb).data == first.data
    assert process_due(app) == 1
    dispatched = len(rec.events)
    assert dispatched >= 1
    (row,) = rows(app)
    assert (row.status, row.attempts, row.next_attempt_at) == ("done", 1, None)
    assert rec.db is not None and rec.credits() == dispatched
    assert post(app, cb).data == first.data
    assert process_due(app) == 0
    assert len(rec.events) == dispatched


def test_deferred_events_are_rebuilt_from_the_stored_body(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock)
    cb = make("collect", app, id="C7", payed_amount="99.50")
    assert post(app, cb).status_code == 200
    process_due(app)
    # The very event the request path would have sent.
    (dispatch,) = read(app, cb).dispatches
    assert [e for _, e in rec.events] == [dispatch.event]
    assert isinstance(dispatch.event, PaymentCollected)


def test_worker_receivers_run_in_an_app_context_without_a_request(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock)
    seen: list[tuple[bool, bool]] = []
    rec.hook = lambda _event: seen.append((has_app_context(), has_request_context()))
    post(app, make("igv", app))
    process_due(app)
    assert seen == [(True, False)]


def test_deferred_refusals_are_the_same(recorder: RecorderFactory, clock: Clock) -> None:
    app, _rec = deferred(recorder, clock)
    cb = make("igv", app)
    forged = dict(cb.headers, **{"X-Signature": "0" * 64})
    response = app.test_client().post(cb.url(), data=cb.body, headers=forged)
    assert (response.status_code, response.get_data(as_text=True)) == (
        401,
        "The X-Signature does not match.",
    )
    assert rows(app) == []
    assert post(app, cb).status_code == 200
    other_body = make("igv", app, request_id=cb.key, order_id=42)
    response = post(app, other_body)
    assert (response.status_code, response.get_data(as_text=True)) == (
        409,
        "This key is stored with a different body.",
    )


def test_deferred_with_no_receiver_keeps_the_delivery_failed(make_app: Any, clock: Clock) -> None:
    app, _hooks, _db = make_app(
        hooks_options={"clock": clock}, ORDERHOOKS_DISPATCH="deferred", ORDERHOOKS_IGV_MAX_AGE=None
    )
    response = post(app, make("igv", app))
    assert (response.status_code, response.get_data(as_text=True)) == (
        503,
        "No receiver is connected to orderhooks.order-pending-delivery; the delivery was kept.",
    )
    (row,) = rows(app)
    assert row.status == "failed"
    assert row.next_attempt_at == clock.at(10)


def test_deferred_receiver_writes_commit_with_the_done_mark(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock)
    rec.fail_next = 1
    post(app, make("collect", app))
    assert process_due(app) == 1
    # The failed attempt's Credit row was rolled back with it.
    assert rec.credits() == 0
    (row,) = rows(app)
    assert row.status == "failed"
    assert row.error == "RuntimeError: receiver exploded on purpose"
    clock.now += 10
    assert process_due(app) == 1
    assert rec.credits() == 1
    assert rows(app)[0].status == "done"


def test_a_commit_time_error_of_the_host_fails_the_attempt_instead_of_the_worker(
    recorder: RecorderFactory, clock: Clock
) -> None:
    """An error raised while the dispatch's transaction commits that is not a
    SQLAlchemy error (a host's ``before_insert``/``before_flush`` validation
    on the models receivers add) fails that attempt, recorded like a
    receiver's error, and the pass goes on. Before, it escaped ``attempt()``
    unrecorded and ``Worker.run`` (which caught StoreUnavailable only) died
    with it; the row stayed processing and took the worker down again at
    every lease end."""
    app, rec = deferred(recorder, clock)

    def refuse(_mapper: Any, _connection: Any, target: Credit) -> None:
        raise ValueError("credit refused by the ledger's validation")

    sa.event.listen(Credit, "before_insert", refuse)
    try:
        post(app, make("collect", app))
        assert process_due(app) == 1
    finally:
        sa.event.remove(Credit, "before_insert", refuse)
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == "ValueError: credit refused by the ledger's validation"
    assert rec.credits() == 0
    # Retried on schedule like any failed attempt, once the ledger agrees.
    clock.now += 10
    assert process_due(app) == 1
    assert (rows(app)[0].status, rec.credits()) == ("done", 1)


def test_a_resend_of_a_failed_deferred_delivery_makes_it_due_now(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock)
    cb = make("igv", app)
    rec.fail_next = 1
    post(app, cb)
    process_due(app)
    assert rows(app)[0].next_attempt_at == clock.at(10)
    assert process_due(app) == 0
    assert post(app, cb).status_code == 200
    (row,) = rows(app)
    assert (row.status, row.next_attempt_at) == ("pending", clock.at(0))
    assert process_due(app) == 1
    assert rows(app)[0].status == "done"
    assert len(rec.events) == 2


def test_the_deferred_acceptance_is_never_relaxed(recorder: RecorderFactory, clock: Clock) -> None:
    """The claim may skip its fsync because the dispatch's commit follows in
    the same request; the acceptance has no such commit after it."""
    app, _rec = deferred(recorder, clock)
    with app.app_context():
        store = app.extensions["orderhooks"].store
        if store.dialect in ("mysql", "mariadb"):
            # InnoDB's commit is durable when the server flushes its log at
            # each commit, and no store statement changes that.
            with store.engine.connect() as connection:
                flush = connection.exec_driver_sql("SELECT @@innodb_flush_log_at_trx_commit")
                assert flush.scalar() == 1
            assert post(app, make("igv", app)).status_code == 200
            return
        if store.dialect == "postgresql":
            # The setting's name is a literal bind of the compiled statement.
            assert "synchronous_commit" in store._sql.claim._defaults.values()
            assert "synchronous_commit" not in store._sql.accept._defaults.values()
            assert "lock_timeout" in store._sql.accept._defaults.values()
            return
        traced: list[str] = []
        with store.engine.connect() as connection:
            driver = connection.connection.dbapi_connection
            assert isinstance(driver, sqlite3.Connection)
            driver.set_trace_callback(traced.append)
            try:
                connection.close()
                assert post(app, make("igv", app)).status_code == 200
            finally:
                driver.set_trace_callback(None)
        assert any(s.startswith("INSERT") for s in traced), traced
        assert not any("PRAGMA synchronous = 1" in s for s in traced), traced


# -- local retries and dead deliveries ----------------------------------------------


def test_inline_failures_are_retried_on_schedule_then_dead(
    recorder: RecorderFactory, clock: Clock, operator: Callable[[Flask], OperatorSignals]
) -> None:
    app, rec = recorder(
        hooks_options={"clock": clock},
        ORDERHOOKS_IGV_MAX_AGE=None,
        ORDERHOOKS_RETRY_DELAYS=[5, 60],
    )
    ops = operator(app)
    rec.fail_next = 10
    cb = make("igv", app)
    assert post(app, cb).status_code == 500
    (row,) = rows(app)
    assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 1, clock.at(5))
    clock.now += 4.9
    assert process_due(app) == 0
    clock.now += 0.1
    assert process_due(app) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 2, clock.at(65))
    clock.now += 60
    assert process_due(app) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts, row.next_attempt_at) == ("dead", 3, None)
    clock.now += 10**6
    assert process_due(app) == 0
    assert len(rec.events) == 3
    assert [(d.attempts, d.status, n) for d, _e, n in ops.failed] == [
        (1, "failed", clock.at(5)),
        (2, "failed", clock.at(65)),
        (3, "dead", None),
    ]
    assert all(e == "RuntimeError: receiver exploded on purpose" for _d, e, _n in ops.failed)
    assert [(d.key, d.status, d.attempts) for d, _e in ops.dead] == [(cb.key, "dead", 3)]
    # A platform's resend still dispatches a dead delivery.
    rec.fail_next = 0
    assert post(app, cb).status_code == 200
    assert rows(app)[0].status == "done"
    assert len(ops.dead) == 1


def test_replay_revives_a_dead_delivery(
    recorder: RecorderFactory, clock: Clock, operator: Callable[[Flask], OperatorSignals]
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[])
    ops = operator(app)
    cb = make("igv", app)
    rec.fail_next = 1
    post(app, cb)
    assert process_due(app) == 1
    assert rows(app)[0].status == "dead"
    assert len(ops.dead) == 1
    runner = app.test_cli_runner()
    listed = runner.invoke(orderhooks, ["deliveries", "--status", "dead"])
    assert cb.key in listed.output and "dead" in listed.output
    shown = runner.invoke(orderhooks, ["show", cb.key])
    assert "  status:   dead" in shown.output
    assert "  next:     -" in shown.output
    result = runner.invoke(orderhooks, ["replay", cb.key])
    assert result.exit_code == 0, result.output
    assert f"igv order-status {cb.key}: replayed, attempt 2: done." in result.output
    assert rows(app)[0].status == "done"
    assert len(rec.events) == 2


def test_an_empty_schedule_means_one_attempt(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = recorder(hooks_options={"clock": clock}, ORDERHOOKS_RETRY_DELAYS=[])
    rec.fail_next = 1
    assert post(app, make("collect", app)).status_code == 500
    assert rows(app)[0].status == "dead"


def test_a_worker_that_died_loses_its_lease_and_the_attempt_counts(
    recorder: RecorderFactory, clock: Clock, operator: Callable[[Flask], OperatorSignals]
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[5])
    ops = operator(app)
    cb = make("igv", app)
    post(app, cb)
    with app.app_context():
        # A worker claims it, then dies before dispatching it.
        due = app.extensions["orderhooks"].store.claim_due()
    assert due is not None and not due.lease_lost
    assert process_due(app) == 0
    assert rows(app)[0].next_attempt_at == clock.at(30)
    clock.now += 31
    assert process_due(app) == 1
    assert len(rec.events) == 1
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 2)
    ((failed, error, next_attempt),) = ops.failed
    assert (failed.attempts, failed.status, next_attempt) == (1, "failed", clock.at(31))
    assert error == LEASE_LOST
    assert rows(app)[0].error == LEASE_LOST


def test_a_lost_last_attempt_is_dead_without_another_dispatch(
    recorder: RecorderFactory, clock: Clock, operator: Callable[[Flask], OperatorSignals]
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[])
    ops = operator(app)
    post(app, make("igv", app))
    with app.app_context():
        assert app.extensions["orderhooks"].store.claim_due() is not None
    clock.now += 31
    assert process_due(app) == 1
    assert rec.events == []
    assert rows(app)[0].status == "dead"
    ((_dead, error),) = ops.dead
    assert error == LEASE_LOST


def test_a_lost_last_attempt_is_dead_with_the_attempts_that_were_made(
    recorder: RecorderFactory, clock: Clock, operator: Callable[[Flask], OperatorSignals]
) -> None:
    """The due claim that finds the lease lost has already counted one more
    attempt (``attempts + 1``); when the lost attempt was the last one the
    worker marks the row dead without dispatching, and that phantom attempt
    must not stay in ``attempts``: one attempt ran, so the row, the ERROR
    log line ("dead after 1 attempts") and delivery_dead all say one."""
    app, rec = deferred(recorder, clock, ORDERHOOKS_CLAIM_TIMEOUT=30, ORDERHOOKS_RETRY_DELAYS=[])
    ops = operator(app)
    post(app, make("igv", app))
    with app.app_context():
        assert app.extensions["orderhooks"].store.claim_due() is not None  # then dies
    clock.now += 31
    assert process_due(app) == 1
    assert rec.events == []
    (row,) = rows(app)
    assert (row.status, row.error) == ("dead", LEASE_LOST)
    assert [f.attempt for f in row.failed_attempts] == [1]
    ((dead, _error),) = ops.dead
    assert (row.attempts, dead.attempts) == (1, 1)


def test_an_operator_receiver_that_raises_changes_nothing(
    recorder: RecorderFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    app, rec = recorder(hooks_options={"clock": clock})

    def broken(_sender: Flask, **_kw: Any) -> None:
        raise ConnectionError("the chat webhook is down")

    delivery_failed.connect(broken, app, weak=False)
    try:
        rec.fail_next = 1
        assert post(app, make("igv", app)).status_code == 500
    finally:
        delivery_failed.disconnect(broken, app)
    assert rows(app)[0].status == "failed"
    assert (
        "a receiver of orderhooks.delivery-failed raised; the delivery is unchanged" in caplog.text
    )


# -- workers --------------------------------------------------------------------


def test_concurrent_workers_dispatch_each_delivery_once(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock)
    lock = threading.Lock()
    keys: list[str] = []

    def record(event: object) -> None:
        assert isinstance(event, OrderPendingDelivery)
        with lock:
            keys.append(event.request_id)

    rec.hook = record
    callbacks = [make("igv", app) for _ in range(40)]
    for cb in callbacks:
        assert post(app, cb).status_code == 200
    with ThreadPoolExecutor(4) as pool:
        attempted = sum(pool.map(lambda _: process_due(app), range(4)))
    assert attempted == 40
    assert sorted(keys) == sorted(cb.key for cb in callbacks)
    assert {r.status for r in rows(app)} == {"done"}


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_a_busy_delivery_never_holds_up_another_worker(make_app: Any) -> None:
    """SKIP LOCKED: while one worker is inside a slow receiver, another worker
    dispatches every other due delivery. (SQLite has one writer: there the
    second worker waits, and a wait past the busy timeout is "busy".)"""
    app, _hooks, _db = make_app(ORDERHOOKS_DISPATCH="deferred")
    inside, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def receive(_sender: Flask, *, event: OrderPendingDelivery, **_kw: Any) -> None:
        seen.append(event.request_id)
        if len(seen) == 1:
            inside.set()
            assert release.wait(20)

    order_pending_delivery.connect(receive, app, weak=False)
    try:
        callbacks = [make("igv", app) for _ in range(6)]
        for cb in callbacks:
            assert post(app, cb).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(process_due, app, 1)
            assert inside.wait(20)
            assert process_due(app) == 5
            release.set()
            assert slow.result(20) == 1
    finally:
        release.set()
        order_pending_delivery.disconnect(receive, app)
    assert sorted(seen) == sorted(cb.key for cb in callbacks)


def test_process_due_honours_its_limit(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = deferred(recorder, clock)
    for _ in range(3):
        post(app, make("igv", app))
    assert process_due(app, limit=2) == 2
    assert process_due(app) == 1
    assert len(rec.events) == 3


def test_dispatch_due_takes_one_given_delivery_only_when_due(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[5])
    first, second = make("igv", app), make("igv", app)
    post(app, first)
    post(app, second)
    with app.app_context():
        hooks: OrderHooks = app.extensions["orderhooks"]
        rec.fail_next = 1
        assert hooks.dispatch_due("igv", "order-status", second.key)
        assert not hooks.dispatch_due("igv", "order-status", second.key)  # not due yet
        assert not hooks.dispatch_due("igv", "order-status", "no-such-key")
        clock.now += 5
        assert hooks.dispatch_due("igv", "order-status", second.key)
    statuses = {r.key: r.status for r in rows(app)}
    assert statuses == {first.key: "pending", second.key: "done"}
    assert len(rec.events) == 2


def test_the_enqueuer_hears_of_stored_and_failed_deliveries(
    recorder: RecorderFactory, clock: Clock
) -> None:
    app, rec = deferred(recorder, clock, ORDERHOOKS_RETRY_DELAYS=[7])
    calls: list[tuple[str, str, str, float]] = []
    hooks: OrderHooks = app.extensions["orderhooks"]
    hooks.enqueuer = lambda *args: calls.append(args)
    cb = make("igv", app)
    post(app, cb)
    post(app, cb)  # a duplicate is not enqueued again
    assert calls == [("igv", "order-status", cb.key, 0.0)]
    rec.fail_next = 1
    process_due(app)
    assert calls[1:] == [("igv", "order-status", cb.key, 7.0)]


def test_an_enqueuer_that_raises_never_fails_the_request(
    recorder: RecorderFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    app, rec = deferred(recorder, clock)

    def broker_down(*_args: object) -> None:
        raise ConnectionRefusedError("broker down")

    app.extensions["orderhooks"].enqueuer = broker_down
    cb = make("igv", app)
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        assert post(app, cb).status_code == 200
    assert (
        f"igv order-status {cb.key}: could not enqueue (ConnectionRefusedError: broker down); "
        "a worker or the sweep will find it" in caplog.text
    )
    assert process_due(app) == 1
    assert len(rec.events) == 1


def test_the_enqueue_warning_quotes_a_key_with_hidden_characters(
    recorder: RecorderFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed gateway id holding U+202E (which reverses the rest of a line
    on a terminal) is stored; the warning writes it as its quoted repr, as
    every other log line does."""
    app, _rec = deferred(recorder, clock)

    def broker_down(*_args: object) -> None:
        raise ConnectionRefusedError("broker down")

    app.extensions["orderhooks"].enqueuer = broker_down
    cb = make("collect", app, id="C\u202e1")
    with caplog.at_level(logging.WARNING, "flask_orderhooks"):
        assert post(app, cb).status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "could not enqueue" in r.getMessage()]
    assert "\u202e" not in line
    assert f"gateway collect {cb.key!r}: could not enqueue" in line, line


def test_worker_stops_after_the_delivery_in_hand(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = deferred(recorder, clock)
    for _ in range(3):
        post(app, make("igv", app))
    state = app.extensions["orderhooks"].state(app)
    worker = Worker(app, state, poll_interval=0.05)
    rec.hook = lambda _event: worker.stop()
    with app.app_context():
        result = worker.run()
    assert (result.attempted, result.done) == (1, 1)
    assert [r.status for r in rows(app)].count("pending") == 2


def test_an_idle_worker_picks_up_a_new_delivery(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = deferred(recorder, clock)
    state = app.extensions["orderhooks"].state(app)
    worker = Worker(app, state, poll_interval=0.05)
    done = threading.Event()

    def finished(_event: object) -> None:
        done.set()
        worker.stop()

    rec.hook = finished

    def run() -> None:
        with app.app_context():
            worker.run()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        time.sleep(0.2)  # idle: a few empty looks
        post(app, make("igv", app))
        assert done.wait(10)
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert rows(app)[0].status == "done"


def _locks_of(worker: Worker) -> list[Any]:
    """Every lock among ``worker``'s attributes: plain and reentrant locks,
    and those inside its Events and Conditions."""
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    found = []
    for attribute in vars(worker).values():
        value = attribute
        if isinstance(value, threading.Event):
            # The Condition whose lock Event.set() takes.
            value = value._cond  # type: ignore[attr-defined]
        if isinstance(value, threading.Condition):
            value = value._lock  # type: ignore[attr-defined]
        if isinstance(value, lock_types):
            found.append(value)
    return found


@contextlib.contextmanager
def _alarm_after(seconds: float, what: str) -> Iterator[None]:
    """Raise in the main thread if the block is still running after
    ``seconds``: a deadlock becomes a failure instead of a hung suite (a
    lock's acquire is interrupted by a signal whose handler raises)."""

    def expired(_signum: int, _frame: Any) -> None:
        raise TimeoutError(what)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_stop_signal_handler_takes_no_lock(recorder: RecorderFactory, clock: Clock) -> None:
    """SIGTERM's handler runs in the main thread between two of its
    bytecodes, whatever the main thread holds then. It called
    ``threading.Event.set()``, which takes the Event's non-reentrant
    condition lock; the main thread holds that lock for a moment inside the
    idle wait (``Event.wait()``), and a signal landing then deadlocked the
    worker for good (``systemctl stop`` waited, then killed it). Delivered
    here while the main thread holds every lock the worker owns, the
    handler returns, and the worker stops."""
    assert threading.current_thread() is threading.main_thread()
    app, _rec = deferred(recorder, clock)
    worker = Worker(app, app.extensions["orderhooks"].state(app), poll_interval=0.05)
    held = _locks_of(worker)
    previous = signal.signal(signal.SIGTERM, worker.stop)
    try:
        for lock in held:
            lock.acquire()
        try:
            with _alarm_after(10, "the SIGTERM handler waits for a lock the main thread holds"):
                signal.raise_signal(signal.SIGTERM)  # its handler runs before this returns
        finally:
            for lock in held:
                lock.release()
    finally:
        signal.signal(signal.SIGTERM, previous)
    with app.app_context():
        result = worker.run()
    assert (result.attempted, result.done, result.failed) == (0, 0, 0)


def test_sigterm_stops_an_idle_worker_and_gives_the_handlers_back(
    recorder: RecorderFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SIGTERM to a worker idling in the main thread (as ``flask
    orderhooks worker`` does): the handler sets the flag, the idle sleep,
    sliced, sees it, and :meth:`Worker.run` returns; the signal handlers it
    installed are given back."""
    assert threading.current_thread() is threading.main_thread()
    app, _rec = deferred(recorder, clock)
    worker = Worker(app, app.extensions["orderhooks"].state(app), poll_interval=0.05)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    # Installed before the signal can be sent: the default SIGTERM would end
    # the test process. run() installs the same, then gives it back.
    signal.signal(signal.SIGTERM, worker.stop)
    main = threading.main_thread().ident
    assert main is not None
    # Sent while the worker idles (a few empty looks), whenever it lands.
    sender = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGTERM))
    try:
        with (
            caplog.at_level(logging.INFO, "flask_orderhooks"),
            _alarm_after(20, "the worker did not stop after SIGTERM"),
            app.app_context(),
        ):
            sender.start()
            result = worker.run()
    finally:
        sender.cancel()
        sender.join()
        signal.signal(signal.SIGTERM, before[0])
    assert result.attempted == 0
    assert "worker: SIGTERM received; stopping" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before[1]


def test_worker_once_prints_what_it_did(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = deferred(recorder, clock)
    for _ in range(3):
        post(app, make("igv", app))
    rec.fail_next = 1
    runner = app.test_cli_runner()
    assert (
        runner.invoke(orderhooks, ["deliveries", "--status", "pending"]).output.count("pending")
        == 3
    )
    result = runner.invoke(orderhooks, ["worker", "--once"])
    assert (result.exit_code, result.output) == (0, "Dispatched 3 deliveries, 1 failed.\n")
    (failed,) = [r for r in rows(app) if r.status == "failed"]
    shown = runner.invoke(orderhooks, ["show", failed.key]).output
    assert f"  next:     {clock.at(10).isoformat()}, in 10s" in shown
    again = runner.invoke(orderhooks, ["worker", "--once"])
    assert again.output == "Dispatched 0 deliveries, 0 failed.\n"


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ORDERHOOKS_DISPATCH", "later", 'must be "inline" or "deferred", not \'later\'.'),
        ("ORDERHOOKS_RETRY_DELAYS", "10,60", "must be a list of seconds, such as [10, 60, 300]"),
        ("ORDERHOOKS_RETRY_DELAYS", [10, -1], "every delay must be a finite number of seconds"),
        ("ORDERHOOKS_RETRY_DELAYS", [10, True], "every delay must be a number of seconds"),
        ("ORDERHOOKS_WORKER_POLL_INTERVAL", 0, "must be at least 0.01 seconds"),
    ],
)
def test_queue_settings_are_checked_at_start_up(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    app = Flask("orderhooks_test", instance_path=str(tmp_path))
    app.config.update(BASE_CONFIG, **{key: value})
    with pytest.raises(ConfigurationError, match=key) as raised:
        OrderHooks(app)
    assert message in str(raised.value)


def test_next_attempt_times_are_utc(recorder: RecorderFactory, clock: Clock) -> None:
    app, rec = recorder(hooks_options={"clock": clock})
    rec.fail_next = 1
    post(app, make("igv", app))
    (row,) = rows(app)
    assert row.next_attempt_at is not None
    assert row.next_attempt_at.utcoffset() == timedelta(0)
    assert row.next_attempt_at - row.updated_at == timedelta(seconds=10)


def test_a_deferred_resend_never_waits_for_a_dispatch_in_progress(
    make_app: Any, clock: Clock
) -> None:
    """A worker's dispatch holds the row (PostgreSQL) or the write lock
    (SQLite) while receivers run. A resend of that delivery must still be
    answered without waiting for the receivers: on PostgreSQL it is, after a
    short lock wait and a plain read. On SQLite it waits for the writer."""
    app, _hooks, _db = make_app(
        hooks_options={"clock": clock},
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_DUPLICATE_WAIT=30,
        ORDERHOOKS_IGV_MAX_AGE=None,
    )
    inside, release = threading.Event(), threading.Event()

    def receive(_sender: Flask, **_kw: Any) -> None:
        inside.set()
        assert release.wait(20)

    order_pending_delivery.connect(receive, app, weak=False)
    cb = make("igv", app)
    try:
        assert post(app, cb).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            worker = pool.submit(process_due, app)
            assert inside.wait(20)
            resend = pool.submit(post, app, cb)
            with app.app_context():
                dialect = app.extensions["orderhooks"].store.dialect
            if dialect == "postgresql":
                # Answered while the receiver is still inside.
                assert resend.result(timeout=15).status_code == 200
                assert not worker.done()
            release.set()
            assert worker.result(timeout=20) == 1
            assert resend.result(timeout=20).status_code == 200
    finally:
        release.set()
        order_pending_delivery.disconnect(receive, app)
    (row,) = rows(app)
    assert (row.status, row.attempts) == ("done", 1)


def test_sqlite_due_query_reads_the_partial_due_index(tmp_path: Path) -> None:
    from flask_orderhooks.store import DUE_INDEX, StandaloneDatabase
    from flask_orderhooks.store.statements import Statements

    database = StandaloneDatabase(
        f"sqlite:///{tmp_path / 'plan.sqlite3'}", busy_timeout=1, engine_options={}
    )
    try:
        database.ensure_table()
        statement = Statements(database.table, database.engine.dialect).claim_due
        with database.engine.connect() as connection:
            plan = connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement.sql, ("x",) * statement.sql.count("?")
            ).all()
            (ddl,) = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = ?", (DUE_INDEX,)
            ).one()
    finally:
        database.engine.dispose()
    details = [row[3] for row in plan]
    assert any(f"USING INDEX {DUE_INDEX} (next_attempt_at<?)" in d for d in details), details
    assert not any(d.startswith("SCAN orderhooks_deliveries") for d in details), details
    assert ddl.endswith("WHERE next_attempt_at IS NOT NULL")


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_postgres_duplicates_and_due_claims_force_no_wal_flush(make_app: Any) -> None:
    """A deferred duplicate must not write (DO UPDATE … WHERE locks the row
    even when nothing changes: an xid, WAL and a synchronous flush per
    duplicate); a worker's due claim commits without the flush, like the
    request's claim (the dispatch's synchronous COMMIT flushes it first)."""
    app, _hooks, _db = make_app(ORDERHOOKS_DISPATCH="deferred")
    with app.app_context():
        sql = app.extensions["orderhooks"].store._sql
        assert "DO NOTHING" in sql.accept.sql
        assert "synchronous_commit" not in sql.accept._defaults.values()
        for claim in (sql.claim_due, sql.claim_due_key):
            assert "synchronous_commit" in claim._defaults.values()
        assert "synchronous_commit" not in sql.revive._defaults.values()
