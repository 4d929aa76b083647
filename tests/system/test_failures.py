"""Production failures against real gunicorn workers: a receiver that raises,
a worker killed mid-dispatch, the database going away. Each must end with
exactly one committed effect per delivery once the platform has retried.

Every test runs on PostgreSQL and MariaDB, and those that need no forwarder
on SQLite too."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.store.statements import LEASE_LOST
from flask_orderhooks.testing import SignedCallback

from . import server_app
from .callbacks import KINDS, mixed, signed
from .conftest import MARIADB, POSTGRESQL, SQLITE, URL_FIXTURES, ReportFn, ServerFactory
from .support import (
    UNAVAILABLE_REASON,
    Answer,
    Forwarder,
    Server,
    backend_name,
    form,
    forwarded,
    is_busy,
    resend_until_success,
    status_counts,
    wait_for,
)

RECEIVER_FAILED = "A receiver failed; the delivery will be retried."

BACKENDS = [POSTGRESQL, MARIADB, SQLITE]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


def delivery(server: Server, cb: SignedCallback) -> StoredDelivery:
    [row] = [
        d
        for d in server.deliveries()
        if (d.provider, d.callback, d.key) == (cb.provider, cb.callback, cb.key)
    ]
    return row


def effects_of(server: Server, cb: SignedCallback) -> list[server_app.Effect]:
    return [
        e
        for e in server.effects()
        if (e.provider, e.callback, e.key) == (cb.provider, cb.callback, cb.key)
    ]


def assert_failure_answer(cb: SignedCallback, answer: Answer, status: int, reason: str) -> None:
    """The platform's exact failure form for ``status`` (never an HTML page)."""
    assert answer.status == status
    if cb.provider == "igv":
        assert answer.content_type == "text/plain; charset=utf-8"
        assert answer.body.decode() == reason
    elif cb.provider == "gateway":
        assert answer.content_type == "text/plain; charset=utf-8"
        assert answer.body == b"fail"
    else:
        assert answer.content_type == "application/json"
        assert json.loads(answer.body) == {"ret_code": status, "ret_msg": reason}


def pid_file(server: Server, cb: SignedCallback) -> str:
    return str(server.control / f"{server_app.marker(cb.key)}.pid")


def blocked_pid(server: Server, cb: SignedCallback) -> int:
    """Wait until ``cb``'s first attempt blocks in its receiver; its worker's pid."""
    path = pid_file(server, cb)
    wait_for(lambda: os.path.exists(path), f"the receiver of {cb.key} to block")
    with open(path) as file:
        return int(file.read())


# -- 2. a receiver that raises -----------------------------------------------------


@pytest.mark.system
def test_receiver_failure_rolls_back_and_the_resend_dispatches_again(
    start_server: ServerFactory, database_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    server = start_server(database_url, receiver="fail-once", workers=3)
    callbacks = mixed(len(KINDS), uuid.uuid4().hex[:12])

    first = [server.post(cb) for cb in callbacks]
    for cb, answer in zip(callbacks, first, strict=True):
        assert_failure_answer(cb, answer, 500, RECEIVER_FAILED)
    # The failed attempt flushed its row before raising: rolled back, not kept.
    assert server.effects() == []
    for cb in callbacks:
        stored = delivery(server, cb)
        assert (stored.status, stored.attempts) == ("failed", 1)
        assert stored.error == f"RuntimeError: {server_app.PLANNED_FAILURE} {cb.key}"
        assert stored.body == cb.body

    second = [server.post(cb) for cb in callbacks]
    assert [form(cb.provider, a)[0] for cb, a in zip(callbacks, second, strict=True)] == [
        "success"
    ] * len(callbacks)
    # A platform retry after success is a duplicate: no third dispatch.
    third = [server.post(cb) for cb in callbacks]
    assert [form(cb.provider, a)[0] for cb, a in zip(callbacks, third, strict=True)] == [
        "success"
    ] * len(callbacks)

    effects = server.effects()
    assert sorted((e.provider, e.callback, e.key, e.note) for e in effects) == sorted(
        (cb.provider, cb.callback, cb.key, "committed") for cb in callbacks
    )
    for cb in callbacks:
        stored = delivery(server, cb)
        assert (stored.status, stored.attempts) == ("done", 2)
        # The first attempt's error stays on record after the retry succeeded.
        assert stored.error == f"RuntimeError: {server_app.PLANNED_FAILURE} {cb.key}"
    errors = [line for line in server.log().splitlines() if line.startswith("ERROR [")]
    for cb in callbacks:
        assert any(f"{cb.provider} {cb.callback} {cb.key}: {RECEIVER_FAILED}" in e for e in errors)
    log = server.log()
    assert log.count(f"RuntimeError: {server_app.PLANNED_FAILURE}") >= len(callbacks)
    report(
        f"{backend_name(database_url)} sync x3: deliveries={len(callbacks)} "
        f"first={status_counts(first)} resend={status_counts(second)} "
        f"retry_after_success={status_counts(third)} dispatches={len(effects)} "
        f"rolled_back_rows={len(callbacks)} attempts=2 each "
        f"runtime={time.monotonic() - started:.1f}s"
    )


# -- 3. a worker killed in the middle of a dispatch ------------------------------------


@pytest.mark.system
def test_killed_worker_is_replaced_and_the_resend_dispatches_once(
    start_server: ServerFactory, database_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    workers = 3
    server = start_server(
        database_url,
        receiver="block-once",
        workers=workers,
        claim_timeout=2.0,
        duplicate_wait=1.0,
        # SQLite: the blocked dispatch holds the write lock; fail fast behind it.
        sqlite_timeout=0.5 if backend_name(database_url) == "sqlite" else None,
    )
    cb = signed("collect", uuid.uuid4().hex[:12])
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(server.post, cb)
        pid = blocked_pid(server, cb)
        assert pid in server.booted_pids()

        # Alive but slow past its lease: a resend must not take it over.
        lease_end = delivery(server, cb).lease_expires_at.timestamp()
        wait_for(lambda: time.time() > lease_end + 0.2, "the claim's lease to run out")
        while_blocked = server.post(cb)
        assert is_busy(cb.provider, while_blocked), while_blocked
        assert effects_of(server, cb) == []

        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConnectionError):
            in_flight.result(timeout=60)

    # gunicorn boots a replacement for the killed worker.
    server.wait_for_workers(workers + 1)
    replacement = server.booted_pids()[workers]
    assert replacement != pid

    resends, refused = resend_until_success(server.port, cb)
    effects = effects_of(server, cb)
    # The killed attempt's flushed row died with its transaction.
    assert [(e.note, e.pid == pid) for e in effects] == [("committed", False)]
    stored = delivery(server, cb)
    # The resend took the dead worker's attempt over and kept it on record,
    # as a worker's due claim would have.
    assert (stored.status, stored.attempts, stored.error) == ("done", 2, LEASE_LOST)
    assert [(f.attempt, f.error) for f in stored.failed_attempts] == [(1, LEASE_LOST)]
    again = server.post(cb)
    assert form(cb.provider, again)[0] == "success"
    assert len(effects_of(server, cb)) == 1
    report(
        f"{backend_name(database_url)} sync x{workers}, lease 2 s: killed pid={pid} "
        f"replaced_by={replacement} answer_while_blocked={while_blocked.status} "
        f"resends_after_kill={resends} refused_before_success={status_counts(refused)} "
        f"dispatches=1 attempts={stored.attempts} runtime={time.monotonic() - started:.1f}s"
    )


# -- 4. the database goes away --------------------------------------------------------


# The forwarder tests run on PostgreSQL and MariaDB (``server_url``): SQLite
# has no connection to take away. ``Forwarder.to`` picks the driver's COMMIT
# for the trap of the lost acknowledgement.


@pytest.mark.system
def test_store_down_answers_failure_then_recovers_exactly_once(
    start_server: ServerFactory, server_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    forwarder = Forwarder.to(server_url)
    with forwarder.running():
        server = start_server(forwarded(server_url, forwarder), workers=3)
        run = uuid.uuid4().hex[:12]
        # Every worker gets pooled connections that the outage will cut.
        warm = mixed(12, run + "w")
        assert [form(cb.provider, server.post(cb))[0] for cb in warm] == ["success"] * 12

        forwarder.stop()
        down = mixed(len(KINDS), run + "d")
        outage: list[Answer] = []
        for _ in range(2):
            for cb in down:
                answer = server.post(cb)
                assert_failure_answer(cb, answer, 503, UNAVAILABLE_REASON)
                outage.append(answer)
        log = server.log()
        for cb in down:
            assert (
                f"flask_orderhooks: {cb.provider} {cb.callback} {cb.key}: store unavailable" in log
            )
        warnings = sum(
            "WARNING" in line and "store unavailable" in line for line in log.splitlines()
        )

        forwarder.start()
        results = [resend_until_success(server.port, cb) for cb in down]
        dispatches = Counter((e.provider, e.callback, e.key) for e in server.effects())
        assert dispatches == Counter((cb.provider, cb.callback, cb.key) for cb in warm + down)
        for cb in down:
            stored = delivery(server, cb)
            # No claim was ever committed during the outage.
            assert (stored.status, stored.attempts) == ("done", 1)
    refused = [a for _, answers in results for a in answers]
    report(
        f"{backend_name(server_url)} via forwarder, sync x3: "
        f"outage_answers={status_counts(outage)} "
        f"warning_lines={warnings} resends_after_restore={[n for n, _ in results]} "
        f"refused_after_restore={status_counts(refused)} dispatches={len(down)} of {len(down)} "
        f"(+{len(warm)} before) connections_forwarded={forwarder.connections} "
        f"runtime={time.monotonic() - started:.1f}s"
    )


@pytest.mark.system
def test_store_lost_during_dispatch_is_retried_once_after_the_lease(
    start_server: ServerFactory, server_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    forwarder = Forwarder.to(server_url)
    with forwarder.running():
        server = start_server(
            forwarded(server_url, forwarder),
            receiver="block-once",
            workers=3,
            claim_timeout=2.0,
            duplicate_wait=1.0,
        )
        cb = signed("sud", uuid.uuid4().hex[:12])
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(server.post, cb)
            blocked_pid(server, cb)
            # The claim is committed and the receiver's row flushed; now the
            # commit that would make them durable cannot reach the database.
            forwarder.stop()
            (server.control / "release").touch()
            answer = in_flight.result(timeout=60)
        assert_failure_answer(cb, answer, 503, UNAVAILABLE_REASON)
        log = server.log()
        assert f"{cb.provider} {cb.callback} {cb.key}: store unavailable" in log

        forwarder.start()
        resends, refused = resend_until_success(server.port, cb)
        effects = effects_of(server, cb)
        assert [e.note for e in effects] == ["committed"]
        stored = delivery(server, cb)
        # The lost attempt could not be recorded as failed; its lease ran out.
        assert (stored.status, stored.attempts) == ("done", 2)
        assert form(cb.provider, server.post(cb))[0] == "success"
        assert len(effects_of(server, cb)) == 1
    reasons = Counter(form(cb.provider, a)[1] or f"status {a.status}" for a in refused)
    report(
        f"{backend_name(server_url)} via forwarder, sync x3, lease 2 s: "
        f"answer_when_commit_lost={answer.status} "
        f"resends_after_restore={resends} refused_before_success={dict(reasons)} "
        f"dispatches=1 attempts={stored.attempts} runtime={time.monotonic() - started:.1f}s"
    )


@pytest.mark.system
def test_commit_acknowledgement_lost_after_the_effects_committed(
    start_server: ServerFactory, server_url: str, report: ReportFn
) -> None:
    """The database commits the effects and the done mark, and the connection
    dies before the worker hears so: the worker must not record a failure
    over the committed delivery, or the platform's retry dispatches twice."""
    started = time.monotonic()
    forwarder = Forwarder.to(server_url)
    with forwarder.running():
        server = start_server(forwarded(server_url, forwarder), workers=2)
        cb = signed("collect", uuid.uuid4().hex[:12])
        direct = sa.create_engine(server_url)
        effects = server_app.Effect.__table__
        # Built, not written: ``key`` is a reserved word on MariaDB, quoted by the dialect.
        query = sa.select(sa.func.count()).select_from(effects).where(effects.c.key == cb.key)

        def committed() -> bool:
            # Each check is a transaction of its own: a fresh snapshot under
            # MariaDB's REPEATABLE READ.
            with direct.connect() as connection:
                return bool(connection.execute(query).scalar())

        # The receiver's INSERT names the host table: that transaction's COMMIT.
        sprung = forwarder.lose_commit_ack(server_app.Effect.__tablename__.encode(), committed)
        try:
            answer = server.post(cb)
        finally:
            direct.dispose()
        assert sprung.is_set()
        # Not knowing whether the commit happened, the worker may only say "retry".
        assert_failure_answer(cb, answer, 503, UNAVAILABLE_REASON)
        assert [e.note for e in effects_of(server, cb)] == ["committed"]
        after_lost_ack = delivery(server, cb)

        resends, refused = resend_until_success(server.port, cb)
        dispatches = len(effects_of(server, cb))
        stored = delivery(server, cb)
    report(
        f"{backend_name(server_url)} via forwarder, sync x2: answer_when_ack_lost={answer.status} "
        f"status_after_lost_ack={after_lost_ack.status} error={after_lost_ack.error!r:.60} "
        f"resends={resends} refused={status_counts(refused)} dispatches={dispatches} "
        f"attempts={stored.attempts} runtime={time.monotonic() - started:.1f}s"
    )
    assert (after_lost_ack.status, after_lost_ack.attempts) == ("done", 1)
    assert dispatches == 1
    assert (stored.status, stored.attempts) == ("done", 1)


@pytest.mark.system
def test_connection_lost_before_the_dispatch_is_replaced_and_dispatches_once(
    start_server: ServerFactory, server_url: str, report: ReportFn
) -> None:
    """The claim commits, then the connection drops before the dispatch's first
    statement; the database itself stays up. No receiver ran, so the done mark
    runs once more on a new connection and the callback is done at its first
    attempt: neither a 503 nor a claim left waiting for the 30 s lease that no
    worker holds any more. The platform's retry is a duplicate."""
    started = time.monotonic()
    forwarder = Forwarder.to(server_url)
    with forwarder.running():
        server = start_server(forwarded(server_url, forwarder), workers=2)
        cb = signed("igv", uuid.uuid4().hex[:12])
        # The done mark, the dispatch's first statement, begins so on both
        # (PostgreSQL's with a placeholder, PyMySQL's with 'done' in the text).
        sprung = forwarder.cut_before(b"UPDATE orderhooks_deliveries SET status=")
        answer = server.post(cb)
        assert sprung.is_set()
        after_cut = delivery(server, cb)
        retry = server.post(cb)
        stored = delivery(server, cb)
        dispatches = len(effects_of(server, cb))
    report(
        f"{backend_name(server_url)} via forwarder, sync x2, default 30 s lease: "
        f"answer_when_cut={answer.status} "
        f"status_after_cut={after_cut.status} retry={retry.status} "
        f"dispatches={dispatches} runtime={time.monotonic() - started:.1f}s"
    )
    assert form(cb.provider, answer)[0] == "success"
    assert (after_cut.status, after_cut.attempts, after_cut.error) == ("done", 1, None)
    assert form(cb.provider, retry)[0] == "success"
    assert (dispatches, stored.status, stored.attempts) == (1, "done", 1)
