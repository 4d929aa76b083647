"""Deferred dispatch through Celery: ``flask_orderhooks.celery.init_celery``.

In-process tests check the two tasks, the enqueuer and the app-context rules
on Celery's in-memory transport. The system tests run the real thing on
PostgreSQL: gunicorn workers that store callbacks and enqueue them, a Redis
broker the test starts itself, and ``celery worker`` processes that dispatch
them. Each ends with exactly one committed effect per delivery, written by a
Celery worker: through a storm, through the broker being killed in the
middle of one, and through a failed attempt whose retry Celery runs after
its delay.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from flask import Flask

from flask_orderhooks import OrderHooks, order_pending_delivery
from flask_orderhooks.celery import DISPATCH_TASK, PROCESS_DUE_TASK, init_celery
from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.testing import SignedCallback, igv_order_status
from tests.conftest import BASE_CONFIG, IGV_SECRET, Recorder

from . import server_app
from .brokers import (
    BROKER_COOLDOWN,
    BROKER_URL,
    FAST_FAILING_BROKER,
    GUNICORN_ARGS,
    REDIS_SERVER,
    CeleryWorker,
    RedisServer,
)
from .callbacks import mixed
from .conftest import ReportFn
from .support import ROOT, Answer, Server, form, post, prepare_database, wait_for

RecorderFactory = Callable[..., tuple[Flask, Recorder]]

#: Longest any test waits for its deliveries to be dispatched: bounds the
#: wait, asserts nothing about speed.
DISPATCH_TIMEOUT = 60.0
ENQUEUE_FAILED = "could not enqueue ("


# -- in-process: the tasks and the enqueuer ------------------------------------------


@dataclass(frozen=True)
class Message:
    """One published task message, as a worker would receive it."""

    task: str
    args: list[Any]
    eta: datetime | None


def memory_celery() -> tuple[Celery, str]:
    """A Celery app on the in-memory transport, with a queue of its own
    (the transport's queues are shared by the whole process)."""
    queue = f"orderhooks-test-{uuid.uuid4().hex[:12]}"
    celery = Celery("orderhooks_test", broker="memory://")
    celery.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    return celery, queue


def published(celery: Celery, queue: str) -> list[Message]:
    """Take every message waiting in ``queue``."""
    messages: list[Message] = []
    with celery.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = simple.get(block=False)
                except simple.Empty:
                    break
                message.ack()
                args, _kwargs, _embed = message.payload
                eta = message.headers.get("eta")
                messages.append(
                    Message(
                        message.headers["task"],
                        list(args),
                        None if eta is None else datetime.fromisoformat(eta),
                    )
                )
        finally:
            simple.close()
    return messages


def post_in_process(app: Flask, callback: SignedCallback) -> Answer:
    response = app.test_client().post(callback.url(), data=callback.body, headers=callback.headers)
    return Answer(response.status_code, response.content_type, response.data)


def stored(app: Flask, callback: SignedCallback) -> StoredDelivery:
    hooks: OrderHooks = app.extensions["orderhooks"]
    with app.app_context():
        [row] = hooks.store.get(callback.key, callback.provider, callback.callback)
    return row


def run_task(celery: Celery, name: str, *args: Any) -> Any:
    """Run a registered task in this process, as a worker would, and return
    its result (re-raising what it raised)."""
    return celery.tasks[name].apply(args=args, throw=True).get()


class FrozenClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_init_celery_registers_both_tasks_and_enqueues_each_stored_delivery(
    recorder: RecorderFactory,
) -> None:
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    hooks = app.extensions["orderhooks"]
    celery, queue = memory_celery()
    init_celery(celery, hooks)
    assert {DISPATCH_TASK, PROCESS_DUE_TASK} <= set(celery.tasks)
    assert (DISPATCH_TASK, PROCESS_DUE_TASK) == ("orderhooks.dispatch", "orderhooks.process_due")
    assert hooks.enqueuer is not None

    cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
    answer = post_in_process(app, cb)
    assert (answer.status, answer.body) == (200, b"OK")
    assert rec.events == []
    assert stored(app, cb).status == "pending"
    # Stored, then enqueued for now: no ETA, which a worker would hold back.
    assert published(celery, queue) == [
        Message(DISPATCH_TASK, ["igv", "order-status", cb.key], None)
    ]

    # Outside any app context, on the one app the extension is registered on.
    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is True
    assert [name for name, _ in rec.events] == ["OrderPendingDelivery"]
    assert (stored(app, cb).status, stored(app, cb).attempts) == ("done", 1)
    # A second message for it (a redelivery, the sweep was first) does nothing.
    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is False
    assert len(rec.events) == 1
    assert run_task(celery, PROCESS_DUE_TASK) == 0
    assert published(celery, queue) == []


def test_a_failed_attempt_is_enqueued_with_its_retry_delay(recorder: RecorderFactory) -> None:
    clock = FrozenClock()
    app, rec = recorder(
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_RETRY_DELAYS=[30],
        hooks_options={"clock": clock},
    )
    celery, queue = memory_celery()
    init_celery(celery, app.extensions["orderhooks"])
    cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
    assert post_in_process(app, cb).status == 200
    published(celery, queue)

    rec.fail_next = 1
    before = datetime.now(UTC)
    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is True
    after = datetime.now(UTC)
    failed = stored(app, cb)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert failed.next_attempt_at == datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=30)
    [retry] = published(celery, queue)
    assert (retry.task, retry.args) == (DISPATCH_TASK, ["igv", "order-status", cb.key])
    assert retry.eta is not None
    # The countdown is the retry delay: Celery adds it to its own "now".
    assert before + timedelta(seconds=30) <= retry.eta <= after + timedelta(seconds=30)

    # A message that arrives before the delivery is due by this worker's
    # clock (clocks of hosts differ) dispatches nothing and is enqueued again
    # for the time that is left.
    clock.now += 10
    before = datetime.now(UTC)
    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is False
    after = datetime.now(UTC)
    assert stored(app, cb).status == "failed"
    [again] = published(celery, queue)
    assert again.eta is not None
    assert before + timedelta(seconds=20) <= again.eta <= after + timedelta(seconds=20)

    clock.now += 20
    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is True
    done = stored(app, cb)
    assert (done.status, done.attempts, done.next_attempt_at) == ("done", 2, None)
    assert len(rec.events) == 2
    assert published(celery, queue) == []


def test_celery_eager_mode_does_not_recurse_on_a_retry_that_is_not_due(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``task_always_eager`` the dispatch runs inside the request that
    stored the delivery. Eager ``apply_async`` ignores the countdown, so a
    retry enqueued after a failed attempt would run at once, find the
    delivery not due, and ``_enqueue_when_due`` enqueue it again, which ran
    at once again...: about 150 nested dispatch tasks (each a due claim and
    a read) inside the platform's request, until RecursionError. In eager
    mode nothing with a countdown is enqueued; the retry waits in the store
    for the sweep."""
    clock = FrozenClock()
    app, rec = recorder(
        ORDERHOOKS_DISPATCH="deferred",
        ORDERHOOKS_RETRY_DELAYS=[30],
        hooks_options={"clock": clock},
    )
    hooks: OrderHooks = app.extensions["orderhooks"]
    celery, queue = memory_celery()
    celery.conf.task_always_eager = True
    init_celery(celery, hooks)
    calls = [0]
    dispatch_due = hooks.dispatch_due

    def counted(*args: str) -> bool:
        calls[0] += 1
        return dispatch_due(*args)

    hooks.dispatch_due = counted  # type: ignore[method-assign, assignment]
    rec.fail_next = 1
    cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
    with caplog.at_level(logging.WARNING):
        assert post_in_process(app, cb).status == 200
    failed = stored(app, cb)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert "RecursionError" not in caplog.text
    # The stored delivery's dispatch only; its retry was not published.
    assert calls[0] == 1
    assert published(celery, queue) == []
    # The sweep dispatches it once it is due.
    clock.now += 30
    with app.app_context():
        assert hooks.process_due() == 1
    assert (stored(app, cb).status, len(rec.events)) == ("done", 2)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_a_message_that_meets_its_delivery_locked_is_enqueued_again(
    recorder: RecorderFactory, database_uri: str
) -> None:
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred", ORDERHOOKS_WORKER_POLL_INTERVAL=0.5)
    celery, queue = memory_celery()
    init_celery(celery, app.extensions["orderhooks"])
    cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
    assert post_in_process(app, cb).status == 200
    published(celery, queue)

    # What a duplicate callback's statement does for a moment: hold the
    # row's lock. The due claim skips locked rows (SKIP LOCKED; SQLite has
    # no row locks).
    engine = sa.create_engine(database_uri)
    try:
        with engine.connect() as holder, holder.begin():
            table = app.extensions["orderhooks"].state(app).store.table
            holder.execute(sa.select(table.c.key).where(table.c.key == cb.key).with_for_update())
            before = datetime.now(UTC)
            assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is False
            after = datetime.now(UTC)
    finally:
        engine.dispose()
    assert (stored(app, cb).status, rec.events) == ("pending", [])
    [again] = published(celery, queue)
    assert (again.task, again.args) == (DISPATCH_TASK, ["igv", "order-status", cb.key])
    # Looked at again after the poll interval, as a worker would.
    assert again.eta is not None
    assert before + timedelta(seconds=0.5) <= again.eta <= after + timedelta(seconds=0.5)

    assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is True
    assert stored(app, cb).status == "done"
    assert len(rec.events) == 1


def test_a_broker_that_is_down_costs_a_warning_never_the_answer(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    # A loopback port nobody listens on: connection refused at once.
    celery = Celery("orderhooks_test", broker="redis://127.0.0.1:9/0")
    celery.conf.update(FAST_FAILING_BROKER, broker_connection_retry_on_startup=True)
    init_celery(celery, app.extensions["orderhooks"])
    cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")

    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        answer = post_in_process(app, cb)
    assert (answer.status, answer.body) == (200, b"OK")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"igv order-status {cb.key}: {ENQUEUE_FAILED}OperationalError: ")
    assert warnings[0].endswith("); a worker or the sweep will find it")
    assert stored(app, cb).status == "pending"

    # The sweep finds it without the broker.
    assert run_task(celery, PROCESS_DUE_TASK) == 1
    assert stored(app, cb).status == "done"
    assert len(rec.events) == 1


def test_after_a_failed_publish_the_broker_rests(
    recorder: RecorderFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's defaults spend seconds reconnecting inside each publish: after
    one failure, requests within the cool-down don't touch the broker."""
    app, rec = recorder(ORDERHOOKS_DISPATCH="deferred")
    celery = Celery("orderhooks_test", broker="redis://127.0.0.1:9/0")
    init_celery(celery, app.extensions["orderhooks"], broker_cooldown=3600)
    calls: list[tuple[Any, ...]] = []

    def refused(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(celery.tasks[DISPATCH_TASK], "apply_async", refused)
    callbacks = [
        igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}") for _ in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="flask_orderhooks"):
        answers = [post_in_process(app, cb).status for cb in callbacks]
    assert answers == [200, 200, 200]
    assert len(calls) == 1, "tried once, then rested"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all(
        "BrokerCoolingDown: the broker failed less than 3600s ago" in w for w in warnings[1:]
    )
    assert run_task(celery, PROCESS_DUE_TASK) == 3
    assert len(rec.events) == 3


def test_the_tasks_run_in_the_active_app_context_or_the_given_app(tmp_path: Path) -> None:
    hooks = OrderHooks()
    apps: list[Flask] = []
    for name in ("first", "second"):
        app = Flask(f"orderhooks_celery_{name}", instance_path=str(tmp_path / name))
        app.config.update(BASE_CONFIG, ORDERHOOKS_DISPATCH="deferred")
        hooks.init_app(app)
        apps.append(app)
    first, second = apps
    received: list[str] = []

    def receive(sender: Flask, *, event: Any, **_: Any) -> None:
        received.append(event.request_id)

    order_pending_delivery.connect(receive, first, weak=False)
    try:
        celery, queue = memory_celery()
        init_celery(celery, hooks)
        cb = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
        assert post_in_process(first, cb).status == 200
        assert len(published(celery, queue)) == 1

        with pytest.raises(RuntimeError) as refused:
            run_task(celery, PROCESS_DUE_TASK)
        assert str(refused.value) == (
            "The orderhooks Celery tasks need a Flask app, and this OrderHooks is "
            "registered on 2 apps. Pass the app: init_celery(celery_app, hooks, app=app), "
            "or run the tasks in an app context (Flask's FlaskTask)."
        )
        # FlaskTask's pattern: the context around the task is the one used.
        with second.app_context():
            assert run_task(celery, PROCESS_DUE_TASK) == 0
        with first.app_context():
            assert run_task(celery, DISPATCH_TASK, "igv", "order-status", cb.key) is True
        assert received == [cb.key]

        # Without a context, app= decides.
        given, given_queue = memory_celery()
        other = OrderHooks()
        third = Flask("orderhooks_celery_third", instance_path=str(tmp_path / "third"))
        third.config.update(BASE_CONFIG, ORDERHOOKS_DISPATCH="deferred")
        other.init_app(third)
        fourth = Flask("orderhooks_celery_fourth", instance_path=str(tmp_path / "fourth"))
        fourth.config.update(BASE_CONFIG, ORDERHOOKS_DISPATCH="deferred")
        other.init_app(fourth)
        order_pending_delivery.connect(receive, fourth, weak=False)
        try:
            init_celery(given, other, app=fourth)
            cb4 = igv_order_status(IGV_SECRET, request_id=f"R{uuid.uuid4().hex[:12]}")
            assert post_in_process(fourth, cb4).status == 200
            assert len(published(given, given_queue)) == 1
            assert run_task(given, PROCESS_DUE_TASK) == 1
            assert received == [cb.key, cb4.key]
        finally:
            order_pending_delivery.disconnect(receive, fourth)
    finally:
        order_pending_delivery.disconnect(receive, first)


def test_the_tasks_keep_the_one_app_alive_and_find_one_registered_later(tmp_path: Path) -> None:
    def worker_celery(name: str) -> tuple[Celery, str]:
        # A worker module's factory: the Flask app is built, registered and
        # dropped; only the Celery app is kept.
        app = Flask(f"orderhooks_celery_{name}", instance_path=str(tmp_path / name))
        app.config.update(BASE_CONFIG, ORDERHOOKS_DISPATCH="deferred")
        celery, queue = memory_celery()
        init_celery(celery, OrderHooks(app))
        return celery, queue

    celery, _queue = worker_celery("dropped")
    gc.collect()
    assert run_task(celery, PROCESS_DUE_TASK) == 0

    # The application factory's order: init_celery() before init_app().
    hooks = OrderHooks()
    unregistered, _queue = memory_celery()
    init_celery(unregistered, hooks)
    with pytest.raises(RuntimeError) as refused:
        run_task(unregistered, PROCESS_DUE_TASK)
    assert str(refused.value) == (
        "The orderhooks Celery tasks need a Flask app, and this OrderHooks is not "
        "registered on any: call hooks.init_app(app) in the worker too, or pass the "
        "app: init_celery(celery_app, hooks, app=app)."
    )
    later = Flask("orderhooks_celery_later", instance_path=str(tmp_path / "later"))
    later.config.update(BASE_CONFIG, ORDERHOOKS_DISPATCH="deferred")
    hooks.init_app(later)
    assert run_task(unregistered, PROCESS_DUE_TASK) == 0


def test_init_celery_refuses_a_second_registration(recorder: RecorderFactory) -> None:
    app, _ = recorder(ORDERHOOKS_DISPATCH="deferred")
    hooks = app.extensions["orderhooks"]
    celery, _queue = memory_celery()
    init_celery(celery, hooks)
    with pytest.raises(RuntimeError) as same_celery:
        init_celery(celery, OrderHooks())
    assert str(same_celery.value) == (
        "init_celery() was already called for this Celery app: its tasks "
        "orderhooks.dispatch and orderhooks.process_due can serve one OrderHooks. "
        "Call init_celery() once per Celery app."
    )
    with pytest.raises(RuntimeError) as same_hooks:
        init_celery(memory_celery()[0], hooks)
    assert str(same_hooks.value) == (
        "This OrderHooks already has an enqueuer (hooks.enqueuer): its deliveries are "
        "handed to one queue. Call init_celery() once per OrderHooks."
    )


# -- the system: gunicorn, Redis and celery worker processes ----------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of the test's own (never the machine's)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        message = (
            f"redis-server is NOT AVAILABLE at {REDIS_SERVER}: the Celery system tests did "
            "not run. Install redis-server or set ORDERHOOKS_TEST_REDIS_SERVER."
        )
        if os.environ.get("ORDERHOOKS_REQUIRE_REDIS") == "1":
            pytest.fail("ORDERHOOKS_REQUIRE_REDIS=1: " + message, pytrace=False)
        pytest.skip(message)
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Stack:
    """One deferred-mode gunicorn server, its broker and its Celery workers."""

    server: Server
    broker: RedisServer
    workers: list[CeleryWorker] = field(default_factory=list)

    def pids(self) -> set[int]:
        return {w.pid for w in self.workers}

    def deliveries(self, callbacks: list[SignedCallback]) -> list[StoredDelivery]:
        wanted = {(cb.provider, cb.callback, cb.key) for cb in callbacks}
        return [d for d in self.server.deliveries() if (d.provider, d.callback, d.key) in wanted]

    def wait_done(self, callbacks: list[SignedCallback], what: str) -> None:
        """Wait (bounded) until every one of ``callbacks`` is stored as done."""

        def done() -> bool:
            rows = self.deliveries(callbacks)
            return len(rows) == len(callbacks) and all(d.status == "done" for d in rows)

        wait_for(done, what, timeout=DISPATCH_TIMEOUT)

    def sweep(self) -> None:
        """Send ``orderhooks.process_due`` as Celery beat would."""
        client = Celery("orderhooks_beat", broker=self.broker.url)
        client.conf.update(FAST_FAILING_BROKER, broker_connection_retry_on_startup=True)
        try:
            client.send_task(PROCESS_DUE_TASK)
        finally:
            client.close()


StackFactory = Callable[..., Stack]


@pytest.fixture
def start_stack(
    pg_url: str, tmp_path: Path, _servers: list[Server], broker: RedisServer
) -> Iterator[StackFactory]:
    """Start gunicorn in deferred mode with a Celery enqueuer, and Celery
    workers on the same settings. Depends on ``pg_url``: the workers stop
    before the schema is dropped (``pg_url`` stops the server)."""
    started: list[CeleryWorker] = []

    def start(
        *,
        receiver: str = "record",
        celery_workers: int = 2,
        gunicorn_workers: int = 4,
        retry_delays: list[float] | None = None,
        claim_timeout: float | None = None,
    ) -> Stack:
        control = tmp_path / "control"
        control.mkdir()
        settings = {
            server_app.DATABASE_URL: pg_url,
            server_app.RECEIVER: receiver,
            server_app.CONTROL_DIR: str(control),
            "ORDERHOOKS_IGV_SECRET": json.dumps(BASE_CONFIG["ORDERHOOKS_IGV_SECRET"]),
            "ORDERHOOKS_GATEWAY_KEY": json.dumps(BASE_CONFIG["ORDERHOOKS_GATEWAY_KEY"]),
            "ORDERHOOKS_SUD_APPS": json.dumps(BASE_CONFIG["ORDERHOOKS_SUD_APPS"]),
            "ORDERHOOKS_DISPATCH": json.dumps("deferred"),
            BROKER_URL: broker.url,
        }
        if retry_delays is not None:
            settings["ORDERHOOKS_RETRY_DELAYS"] = json.dumps(retry_delays)
        if claim_timeout is not None:
            settings["ORDERHOOKS_CLAIM_TIMEOUT"] = json.dumps(claim_timeout)
        prepare_database(settings)
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        server = Server(
            # gunicorn's command line stays the one every system test uses:
            # its config module (celery_app) attaches the enqueuer.
            settings={**settings, "GUNICORN_CMD_ARGS": GUNICORN_ARGS, "PYTHONPATH": python_path},
            control=control,
            log_path=tmp_path / "gunicorn.log",
            workers=gunicorn_workers,
            threads=1,
        )
        _servers.append(server)
        server.start()
        stack = Stack(server, broker)
        for number in range(celery_workers):
            worker = CeleryWorker(
                settings=settings,
                log_path=tmp_path / f"celery-{number}.log",
                name=f"orderhooks{number}",
            )
            started.append(worker)
            worker.start()
            stack.workers.append(worker)
        return stack

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


@dataclass(frozen=True)
class Sent:
    callback: SignedCallback
    answer: Answer
    seconds: float


def storm(
    port: int,
    jobs: list[SignedCallback],
    threads: int,
    on_answer: Callable[[], None] = lambda: None,
) -> list[Sent]:
    def send(cb: SignedCallback) -> Sent:
        started = time.monotonic()
        answer = post(port, cb)
        sent = Sent(cb, answer, time.monotonic() - started)
        on_answer()
        return sent

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, jobs))


def not_success(sent: list[Sent]) -> list[tuple[str, str, str]]:
    return [
        (s.callback.provider, s.callback.key, form(s.callback.provider, s.answer)[1])
        for s in sent
        if form(s.callback.provider, s.answer)[0] != "success"
    ]


def check_exactly_once(stack: Stack, callbacks: list[SignedCallback]) -> Counter[int]:
    """One committed effect and one done delivery per callback, every effect
    written by a Celery worker; returns the effects per worker pid."""
    expected = {(cb.provider, cb.callback, cb.key) for cb in callbacks}
    assert len(expected) == len(callbacks)
    effects = stack.server.effects()
    dispatches = Counter((e.provider, e.callback, e.key) for e in effects)
    assert set(dispatches) == expected
    assert [k for k, n in dispatches.items() if n != 1] == []
    assert {e.note for e in effects} == {"committed"}
    by_pid = Counter(e.pid for e in effects)
    assert set(by_pid) <= stack.pids(), (by_pid, stack.pids())
    assert Counter(d.status for d in stack.deliveries(callbacks)) == {"done": len(callbacks)}
    return by_pid


def max_seconds(sent: list[Sent]) -> float:
    return max((s.seconds for s in sent), default=0.0)


@pytest.mark.system
@pytest.mark.postgres
def test_a_storm_is_dispatched_once_each_by_the_celery_workers(
    start_stack: StackFactory, report: ReportFn
) -> None:
    started = time.monotonic()
    stack = start_stack(celery_workers=2)
    callbacks = mixed(160, uuid.uuid4().hex[:12])
    copies = 2
    # Every copy of a key next to the others: duplicates race each other and
    # the Celery worker dispatching the first.
    sent = storm(stack.server.port, [cb for cb in callbacks for _ in range(copies)], threads=16)
    assert not_success(sent) == []

    stack.wait_done(callbacks, "the Celery workers to dispatch the storm")
    by_pid = check_exactly_once(stack, callbacks)
    rows = stack.deliveries(callbacks)
    assert Counter((d.attempts, d.error) for d in rows) == {(1, None): len(callbacks)}
    assert ENQUEUE_FAILED not in stack.server.log()
    # One message per stored delivery; more when one met its row held by a
    # duplicate's statement and was enqueued again.
    messages = sum(
        len(re.findall(rf"Task {re.escape(DISPATCH_TASK)}\[\S+\] received", w.log()))
        for w in stack.workers
    )
    assert messages >= len(callbacks)
    report(
        f"postgresql gunicorn x4 + celery solo x{len(stack.workers)}, deferred: "
        f"keys={len(callbacks)} copies={copies} requests={len(sent)} all success, "
        f"dispatches={sum(by_pid.values())} per_worker={sorted(by_pid.values())} "
        f"messages={messages} "
        f"slowest_answer={max_seconds(sent):.3f}s runtime={time.monotonic() - started:.1f}s"
    )


@pytest.mark.system
@pytest.mark.postgres
def test_a_broker_killed_mid_storm_loses_no_delivery(
    start_stack: StackFactory, report: ReportFn
) -> None:
    started = time.monotonic()
    stack = start_stack(celery_workers=2)
    run = uuid.uuid4().hex[:10]
    during = mixed(240, f"{run}a")
    after_kill = mixed(40, f"{run}b")
    after_restart = mixed(40, f"{run}c")

    # The broker dies while the storm is in flight, a third of the way in.
    answered = 0
    lock = threading.Lock()
    third = threading.Event()

    def count() -> None:
        nonlocal answered
        with lock:
            answered += 1
            if answered == len(during) // 3:
                third.set()

    with ThreadPoolExecutor(1) as killer:

        def kill_at_a_third() -> None:
            if third.wait(DISPATCH_TIMEOUT):
                stack.broker.kill()

        killing = killer.submit(kill_at_a_third)
        sent = storm(stack.server.port, during, threads=12, on_answer=count)
        killing.result(timeout=DISPATCH_TIMEOUT)
    assert third.is_set()
    assert stack.broker.process is None
    # Still down: every one of these is stored, answered success, and can
    # only be found by the sweep.
    down = storm(stack.server.port, after_kill, threads=12)
    assert not_success(sent) == []
    assert not_success(down) == []

    log = stack.server.log()
    for cb in after_kill:
        assert f"{cb.provider} {cb.callback} {cb.key}: {ENQUEUE_FAILED}" in log
    assert Counter(d.status for d in stack.deliveries(after_kill)) == {"pending": len(after_kill)}
    warned = log.count(ENQUEUE_FAILED)

    # The broker returns on the same port, empty; the workers reconnect and
    # the web workers enqueue again.
    stack.broker.start()
    for worker in stack.workers:
        worker.wait_connected(2)
    # The web processes leave the broker alone for a moment after a failed
    # publish (init_celery's broker_cooldown), then enqueue again.
    time.sleep(BROKER_COOLDOWN + 0.5)
    back = storm(stack.server.port, after_restart, threads=12)
    assert not_success(back) == []
    stack.wait_done(after_restart, "the deliveries enqueued after the broker returned")
    assert all(f"{cb.key}: {ENQUEUE_FAILED}" not in stack.server.log() for cb in after_restart)

    # Whatever the outage lost (its queue, and everything stored while it
    # was down) is still due in the store: the sweep dispatches it.
    lost = [d for d in stack.deliveries(during + after_kill) if d.status == "pending"]
    assert len(lost) >= len(after_kill)
    stack.sweep()
    everything = during + after_kill + after_restart
    stack.wait_done(everything, "the sweep to dispatch what the outage lost")
    by_pid = check_exactly_once(stack, everything)
    assert {d.attempts for d in stack.deliveries(everything)} == {1}
    report(
        f"postgresql gunicorn x4 + celery solo x{len(stack.workers)}, deferred: "
        f"requests={len(sent) + len(down) + len(back)} all success; broker killed after "
        f"{len(during) // 3} answers; enqueue_warnings={warned} "
        f"pending_before_sweep={len(lost)} dispatches={sum(by_pid.values())} "
        f"slowest_answer up={max_seconds(sent):.3f}s down={max_seconds(down):.3f}s "
        f"back={max_seconds(back):.3f}s runtime={time.monotonic() - started:.1f}s"
    )


@pytest.mark.system
@pytest.mark.postgres
def test_a_failed_attempt_is_retried_by_celery_after_its_delay(
    start_stack: StackFactory, report: ReportFn
) -> None:
    started = time.monotonic()
    claim_timeout = 30.0
    stack = start_stack(
        receiver="fail-once", celery_workers=2, retry_delays=[1], claim_timeout=claim_timeout
    )
    callbacks = mixed(8, uuid.uuid4().hex[:12])
    sent = storm(stack.server.port, callbacks, threads=8)
    # Deferred: stored and acknowledged before any receiver ran.
    assert not_success(sent) == []

    # No sweep and no other worker: only the re-enqueued message can run
    # the second attempt, and only once it is due.
    stack.wait_done(callbacks, "Celery to retry every failed attempt")
    by_pid = check_exactly_once(stack, callbacks)
    failures = server_app.signal_records(stack.server.control, "delivery_failed")
    assert sorted((r["provider"], r["callback"], r["key"]) for r in failures) == sorted(
        (cb.provider, cb.callback, cb.key) for cb in callbacks
    )
    assert {r["pid"] for r in failures} <= stack.pids()
    assert server_app.signal_records(stack.server.control, "delivery_dead") == []
    planned = {(r["provider"], r["callback"], r["key"]): r for r in failures}
    for row in stack.deliveries(callbacks):
        record = planned[(row.provider, row.callback, row.key)]
        assert (row.status, row.attempts) == ("done", 2)
        assert row.error == f"RuntimeError: {server_app.PLANNED_FAILURE} {row.key}"
        due = datetime.fromisoformat(record["signal_next_attempt_at"])
        assert record["status"] == "failed"
        # The second attempt was claimed no earlier than its retry delay
        # allowed (its lease ran from the claim).
        claimed = row.lease_expires_at - timedelta(seconds=claim_timeout)
        assert claimed >= due, (row.key, claimed, due)
    received = sum(w.log().count(f"Task {DISPATCH_TASK}[") for w in stack.workers)
    report(
        f"postgresql gunicorn x4 + celery solo x{len(stack.workers)}, deferred, retry "
        f"delays [1]: deliveries={len(callbacks)} failed_first={len(failures)} "
        f"done_second={len(callbacks)} dispatches={sum(by_pid.values())} "
        f"task_log_lines={received} runtime={time.monotonic() - started:.1f}s"
    )
