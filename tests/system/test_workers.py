"""Deferred dispatch under real servers: gunicorn stores every verified delivery
as pending and answers at once; ``flask orderhooks worker`` processes run the
receivers, retry failures on the local schedule and give up (``dead``) after
the last attempt. Each must still end with exactly one committed effect per
delivery that succeeded, and none for one that never did.

Several workers share the due queue on PostgreSQL and MariaDB (``SELECT … FOR
UPDATE SKIP LOCKED``, MariaDB ≥ 10.6); SQLite serialises them."""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flask_orderhooks.store import StoredDelivery
from flask_orderhooks.store.statements import LEASE_LOST
from flask_orderhooks.testing import SignedCallback

from . import server_app
from .callbacks import KINDS, mixed, signed
from .conftest import (
    MARIADB,
    POSTGRESQL,
    SQLITE,
    URL_FIXTURES,
    ReportFn,
    ServerFactory,
    WorkerFactory,
)
from .support import (
    Answer,
    Server,
    backend_name,
    flask_command,
    form,
    is_busy,
    post,
    resend_until_success,
    status_counts,
    wait_for,
)

BACKENDS = [POSTGRESQL, MARIADB, SQLITE]
#: Seconds an idle worker sleeps between looks in these tests.
POLL = 0.1
#: The longest any test waits for the workers to work through their queue.
DRAIN_TIMEOUT = 120.0
FINAL = frozenset({"done", "dead"})

Key = tuple[str, str, str]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


def key_of(cb: SignedCallback) -> Key:
    return cb.provider, cb.callback, cb.key


def by_key(server: Server) -> dict[Key, StoredDelivery]:
    return {(d.provider, d.callback, d.key): d for d in server.deliveries()}


def delivery(server: Server, cb: SignedCallback) -> StoredDelivery:
    return by_key(server)[key_of(cb)]


def effects_of(server: Server, cb: SignedCallback) -> list[server_app.Effect]:
    return [e for e in server.effects() if (e.provider, e.callback, e.key) == key_of(cb)]


def all_success(callbacks: Iterable[SignedCallback], answers: Iterable[Answer]) -> list[str]:
    """Every answer that is not the platform's success, described."""
    return [
        f"{cb.provider} {cb.key}: {form(cb.provider, a)}"
        for cb, a in zip(callbacks, answers, strict=True)
        if form(cb.provider, a)[0] != "success"
    ]


def wait_until_settled(server: Server, count: int, timeout: float = DRAIN_TIMEOUT) -> None:
    """Wait until ``count`` deliveries are stored and each is done or dead."""
    seen: list[Counter[str]] = [Counter()]

    def settled() -> bool:
        deliveries = server.deliveries()
        seen[0] = Counter(d.status for d in deliveries)
        return len(deliveries) == count and set(seen[0]) <= FINAL

    try:
        wait_for(settled, f"{count} deliveries to be done or dead", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; statuses {dict(seen[0])}") from None


def wait_for_status(
    server: Server, callbacks: list[SignedCallback], status: str, attempts: int
) -> dict[Key, StoredDelivery]:
    """Wait until every delivery of ``callbacks`` has ``status`` and ``attempts``."""
    wanted = {key_of(cb) for cb in callbacks}
    latest: list[dict[Key, StoredDelivery]] = [{}]

    def reached() -> bool:
        rows = {k: d for k, d in by_key(server).items() if k in wanted}
        latest[0] = rows
        return len(rows) == len(wanted) and all(
            (d.status, d.attempts) == (status, attempts) for d in rows.values()
        )

    try:
        wait_for(reached, f"{len(wanted)} deliveries {status} after {attempts} attempts")
    except AssertionError as exc:
        now = sorted((k[2], d.status, d.attempts) for k, d in latest[0].items())
        raise AssertionError(f"{exc}; now {now}") from None
    return latest[0]


def attempt_files(server: Server, cb: SignedCallback) -> int:
    """How many attempts the counting receivers (fail-twice, fail-always) saw."""
    return len(list(server.control.glob(f"{server_app.marker(cb.key)}.attempt-*")))


def pid_file(server: Server, cb: SignedCallback) -> Path:
    return server.control / f"{server_app.marker(cb.key)}.pid"


def blocked_pid(server: Server, cb: SignedCallback) -> int:
    """Wait until ``cb``'s first attempt blocks in its receiver; its process's pid."""
    path = pid_file(server, cb)
    wait_for(path.exists, f"the receiver of {cb.key} to block")
    return int(path.read_text())


def records_by_key(server: Server, name: str) -> dict[Key, list[dict[str, object]]]:
    grouped: dict[Key, list[dict[str, object]]] = {}
    for record in server_app.signal_records(server.control, name):
        key = (str(record["provider"]), str(record["callback"]), str(record["key"]))
        grouped.setdefault(key, []).append(record)
    return grouped


def worker_errors(logs: Iterable[str]) -> list[str]:
    """The worker logs that hold a traceback. Only for tests whose receivers
    never fail: a planned failure is logged with its traceback."""
    return [log for log in logs if "Traceback" in log]


def planned_error(attempt: int, key: str) -> str:
    return f"RuntimeError: {server_app.PLANNED_ATTEMPT_FAILURE} {attempt} for {key}"


# -- 1. a deferred storm on a database server with three workers ----------------------


@pytest.mark.system
def test_deferred_storm_is_dispatched_once_by_three_workers(
    start_server: ServerFactory, start_worker: WorkerFactory, server_url: str, report: ReportFn
) -> None:
    """PostgreSQL and MariaDB (``server_url``)."""
    started = time.monotonic()
    keys, copies, clients = 200, 10, 24
    server = start_server(server_url, workers=4, dispatch="deferred", poll_interval=0.2)
    workers = [start_worker(server) for _ in range(3)]
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    # Copies of a key next to each other: they race across the gunicorn workers.
    jobs = [cb for cb in callbacks for _ in range(copies)]
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda cb: post(server.port, cb), jobs))
    answered = time.monotonic() - started
    # Stored before the answer, so the platform may always read success.
    assert all_success(jobs, answers) == []

    wait_until_settled(server, keys)
    drained = time.monotonic() - started
    effects = server.effects()
    dispatches = Counter((e.provider, e.callback, e.key) for e in effects)
    assert set(dispatches) == {key_of(cb) for cb in callbacks}
    assert [k for k, n in dispatches.items() if n != 1] == []
    assert {e.note for e in effects} == {"committed"}
    # Receivers ran on the workers only, never in gunicorn's requests.
    worker_pids = {w.pid for w in workers}
    assert {e.pid for e in effects} <= worker_pids
    deliveries = server.deliveries()
    assert Counter(d.status for d in deliveries) == {"done": keys}
    assert Counter(d.attempts for d in deliveries) == {1: keys}
    assert [d for d in deliveries if d.error is not None or d.next_attempt_at is not None] == []

    # A platform's retry of a done delivery is a duplicate: no second dispatch.
    with ThreadPoolExecutor(clients) as pool:
        again = list(pool.map(lambda cb: post(server.port, cb), callbacks))
    assert all_success(callbacks, again) == []
    assert len(server.effects()) == keys

    per_worker = Counter(e.pid for e in effects)
    assert worker_errors(w.log() for w in workers) == []
    exits = [w.stop() for w in workers]
    assert exits == [0, 0, 0]
    report(
        f"{backend_name(server_url)} sync x4 + 3 workers, deferred, {clients} clients: "
        f"keys={keys} "
        f"copies={copies} requests={len(jobs)} answers={status_counts(answers)} "
        f"dispatches={sum(dispatches.values())} per_worker={sorted(per_worker.values())} "
        f"resent_after_done={status_counts(again)} worker_exits={exits} "
        f"answered_in={answered:.1f}s drained_in={drained:.1f}s "
        f"runtime={time.monotonic() - started:.1f}s"
    )


# -- 2. a worker SIGKILLed inside a receiver -----------------------------------------


@pytest.mark.system
def test_worker_killed_in_a_receiver_is_redispatched_once_after_its_lease(
    start_server: ServerFactory, start_worker: WorkerFactory, database_url: str, report: ReportFn
) -> None:
    """PostgreSQL and MariaDB: the other worker skips the locked row (SKIP
    LOCKED), and the server rolls the killed worker's transaction back when
    its connection drops. SQLite: the blocked dispatch holds the write lock,
    so the other worker's looks are refused ("database is locked") until the
    kill releases it."""
    started = time.monotonic()
    server = start_server(
        database_url,
        receiver="block-once",
        workers=2,
        dispatch="deferred",
        claim_timeout=2.0,
        poll_interval=POLL,
    )
    workers = [start_worker(server) for _ in range(2)]
    cb = signed("collect", uuid.uuid4().hex[:12])
    answer = server.post(cb)
    assert form(cb.provider, answer)[0] == "success", answer

    pid = blocked_pid(server, cb)
    [victim] = [w for w in workers if w.pid == pid]
    [survivor] = [w for w in workers if w is not victim]
    held = delivery(server, cb)
    assert (held.status, held.attempts) == ("processing", 1)
    # A processing row is due again at its lease end.
    assert held.next_attempt_at == held.lease_expires_at

    # Alive but slow past its lease: the other worker, polling all along, must
    # not take it over while the first one still holds it.
    lease_end = held.lease_expires_at.timestamp()
    wait_for(lambda: time.time() > lease_end + 10 * POLL, "the claim's lease to run out")
    still = delivery(server, cb)
    assert (still.status, still.attempts) == ("processing", 1)
    assert effects_of(server, cb) == []

    assert victim.kill() == -signal.SIGKILL
    wait_for(lambda: delivery(server, cb).status in FINAL, "the survivor to take it over")
    effects = effects_of(server, cb)
    # The killed attempt's flushed row died with its transaction.
    assert [(e.note, e.pid) for e in effects] == [("committed", survivor.pid)]
    stored = delivery(server, cb)
    # The takeover records the lost attempt's error (since 438d06e, as
    # tests/test_delivery_queue.py asserts); it stays after the success.
    assert (stored.status, stored.attempts, stored.error) == ("done", 2, LEASE_LOST)
    assert stored.next_attempt_at is None
    # A platform's retry is a duplicate of the done delivery.
    assert form(cb.provider, server.post(cb))[0] == "success"
    assert len(effects_of(server, cb)) == 1
    assert survivor.running()
    exit_code = survivor.stop()
    assert exit_code == 0
    # Not asserted: the contract leaves open whether a lost attempt is signalled.
    lost_signals = len(server_app.signal_records(server.control, "delivery_failed"))
    report(
        f"{backend_name(database_url)} sync x2 + 2 workers, deferred, lease 2 s: killed pid={pid} "
        f"taken_over_by={survivor.pid} dispatches={len(effects)} attempts={stored.attempts} "
        f"delivery_failed_signals={lost_signals} "
        f"survivor_exit={exit_code} runtime={time.monotonic() - started:.1f}s"
    )


# -- 3. failing twice, then done on the schedule --------------------------------------


@pytest.mark.system
def test_failed_attempts_are_retried_on_the_schedule_until_done(
    start_server: ServerFactory, start_worker: WorkerFactory, server_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    delays = [30.0, 120.0]
    server = start_server(
        server_url,
        receiver="fail-twice",
        workers=2,
        dispatch="deferred",
        retry_delays=delays,
        poll_interval=POLL,
        clock=True,
    )
    clock_file = Path(server.settings[server_app.CLOCK_FILE])
    clock = server_app.offset_clock(clock_file)
    worker = start_worker(server)
    callbacks = mixed(len(KINDS), uuid.uuid4().hex[:12])

    # The earliest clock reading the next attempt's failure can carry.
    earliest = clock()
    answers = [server.post(cb) for cb in callbacks]
    assert all_success(callbacks, answers) == []

    offset = 0.0
    schedule: dict[Key, list[str]] = {key_of(cb): [] for cb in callbacks}
    for attempt, delay in enumerate(delays, start=1):
        rows = wait_for_status(server, callbacks, "failed", attempt)
        latest = clock()
        for cb in callbacks:
            stored = rows[key_of(cb)]
            assert stored.error == planned_error(attempt, cb.key)
            assert stored.next_attempt_at is not None
            # Due ``delay`` seconds after this attempt failed, on the injected clock.
            failed_at = stored.next_attempt_at.timestamp() - delay
            assert earliest <= failed_at <= latest, (cb.key, earliest, failed_at, latest)
            schedule[key_of(cb)].append(stored.next_attempt_at.isoformat())
        # Not before its time: the worker looks ~10 times, finds nothing due.
        time.sleep(10 * POLL)
        unchanged = by_key(server)
        assert [
            (unchanged[key_of(cb)].status, unchanged[key_of(cb)].attempts) for cb in callbacks
        ] == [("failed", attempt)] * len(callbacks)
        assert [attempt_files(server, cb) for cb in callbacks] == [attempt] * len(callbacks)
        # Jump every process's clock past the delay.
        offset += delay
        earliest = time.time() + offset
        server_app.set_clock_offset(clock_file, offset)

    rows = wait_for_status(server, callbacks, "done", len(delays) + 1)
    effects = server.effects()
    assert sorted((e.provider, e.callback, e.key, e.note, e.pid) for e in effects) == sorted(
        (*key_of(cb), "committed", worker.pid) for cb in callbacks
    )
    for cb in callbacks:
        stored = rows[key_of(cb)]
        assert stored.next_attempt_at is None
        # The last failure stays on record after the retry succeeded, as inline.
        assert stored.error == planned_error(len(delays), cb.key)
        assert attempt_files(server, cb) == len(delays) + 1

    failed = records_by_key(server, "delivery_failed")
    assert set(failed) == {key_of(cb) for cb in callbacks}
    for cb in callbacks:
        records = failed[key_of(cb)]
        assert [r["signal_next_attempt_at"] for r in records] == schedule[key_of(cb)]
        assert [server_app.PLANNED_ATTEMPT_FAILURE in str(r["signal_error"]) for r in records] == [
            True
        ] * len(delays)
        assert {r["pid"] for r in records} == {worker.pid}
    assert records_by_key(server, "delivery_dead") == {}
    exit_code = worker.stop()
    assert exit_code == 0
    report(
        f"{backend_name(server_url)} + 1 worker, deferred, delays {delays} on a jumped clock: "
        f"deliveries={len(callbacks)} attempts=3 each failed_signals="
        f"{sum(len(r) for r in failed.values())} dead_signals=0 dispatches={len(effects)} "
        f"clock_offset={offset:g}s worker_exit={exit_code} "
        f"runtime={time.monotonic() - started:.1f}s"
    )


# -- 4. every attempt fails: dead, and delivery_dead once -----------------------------


@pytest.mark.system
def test_exhausted_retries_end_dead_with_one_delivery_dead_signal(
    start_server: ServerFactory, start_worker: WorkerFactory, server_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    delays = [1.0, 1.0]
    attempts = len(delays) + 1
    server = start_server(
        server_url,
        receiver="fail-always",
        workers=2,
        dispatch="deferred",
        retry_delays=delays,
        poll_interval=POLL,
    )
    workers = [start_worker(server) for _ in range(3)]
    callbacks = mixed(2 * len(KINDS), uuid.uuid4().hex[:12])
    answers = [server.post(cb) for cb in callbacks]
    assert all_success(callbacks, answers) == []

    wait_for_status(server, callbacks, "dead", attempts)
    # Given up for good: a look after more than a retry delay changes nothing.
    time.sleep(delays[-1] + 10 * POLL)
    rows = wait_for_status(server, callbacks, "dead", attempts)
    for cb in callbacks:
        stored = rows[key_of(cb)]
        assert stored.error == planned_error(attempts, cb.key)
        assert stored.next_attempt_at is None
        assert attempt_files(server, cb) == attempts
    # Every attempt's flushed row was rolled back.
    assert server.effects() == []

    dead = records_by_key(server, "delivery_dead")
    assert {k: len(r) for k, r in dead.items()} == {key_of(cb): 1 for cb in callbacks}
    worker_pids = {w.pid for w in workers}
    for cb in callbacks:
        [record] = dead[key_of(cb)]
        assert record["pid"] in worker_pids
        assert record["status"] == "dead"
        assert f"{server_app.PLANNED_ATTEMPT_FAILURE} {attempts} for" in str(record["signal_error"])
    failed = records_by_key(server, "delivery_failed")
    for cb in callbacks:
        records = failed.get(key_of(cb), [])
        # One delivery_failed per failed attempt; the last has no next attempt.
        assert [r["signal_next_attempt_at"] is None for r in records] == [False] * len(delays) + [
            True
        ], (cb.key, records)
    exits = [w.stop() for w in workers]
    assert exits == [0, 0, 0]
    senders = Counter(int(str(r["pid"])) for records in dead.values() for r in records)
    report(
        f"{backend_name(server_url)} + 3 workers, deferred, delays {delays}: "
        f"deliveries={len(callbacks)} "
        f"dead={len(rows)} attempts={attempts} each dead_signals="
        f"{sum(len(r) for r in dead.values())} (senders {sorted(senders.values())}) "
        f"failed_signals={sum(len(r) for r in failed.values())} effects=0 "
        f"worker_exits={exits} runtime={time.monotonic() - started:.1f}s"
    )


# -- 5. SQLite: gunicorn and one worker -----------------------------------------------


@pytest.mark.system
def test_deferred_storm_on_sqlite_with_one_worker(
    start_server: ServerFactory, start_worker: WorkerFactory, sqlite_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    keys, copies, clients = 60, 10, 16
    server = start_server(
        sqlite_url,
        workers=4,
        threads=4,
        dispatch="deferred",
        poll_interval=POLL,
        # Should a store error fail an attempt or strand a claim, the retry
        # comes within the drain instead of after the 10 s / 30 s defaults.
        retry_delays=[1.0] * 6,
        claim_timeout=5.0,
    )
    worker = start_worker(server)
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    jobs = [cb for cb in callbacks for _ in range(copies)]
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda cb: post(server.port, cb), jobs))
    wrong = [
        f"{cb.provider} {cb.key}: {form(cb.provider, a)}"
        for cb, a in zip(jobs, answers, strict=True)
        if form(cb.provider, a)[0] != "success" and not is_busy(cb.provider, a)
    ]
    # Only success or "busy, retry" (SQLite's single writer): nothing else.
    assert wrong == []
    busy = [cb for cb, a in zip(jobs, answers, strict=True) if is_busy(cb.provider, a)]
    resends = sum(resend_until_success(server.port, cb)[0] for cb in busy)

    wait_until_settled(server, keys)
    effects = server.effects()
    dispatches = Counter((e.provider, e.callback, e.key) for e in effects)
    assert set(dispatches) == {key_of(cb) for cb in callbacks}
    assert [k for k, n in dispatches.items() if n != 1] == []
    assert {(e.note, e.pid) for e in effects} == {("committed", worker.pid)}
    deliveries = server.deliveries()
    assert Counter(d.status for d in deliveries) == {"done": keys}
    errors = [d.error for d in deliveries if d.error is not None]
    # No receiver fails here: only a store error may be on record.
    assert [e for e in errors if not e.startswith("OperationalError")] == []
    assert worker_errors([worker.log()]) == []
    exit_code = worker.stop()
    assert exit_code == 0
    report(
        f"sqlite WAL gthread 4x4 + 1 worker, deferred, {clients} clients: keys={keys} "
        f"copies={copies} requests={len(jobs)} answers={status_counts(answers)} "
        f"busy_resent={len(busy)} resends={resends} dispatches={sum(dispatches.values())} "
        f"attempts={dict(Counter(d.attempts for d in deliveries))} "
        f"store_errors={len(errors)} worker_exit={exit_code} "
        f"runtime={time.monotonic() - started:.1f}s"
    )


# -- 6. SIGTERM finishes the delivery in hand, then exits 0 -------------------------

_DISPATCHED = re.compile(r"^Dispatched (\d+) deliver(?:y|ies), (\d+) failed\.$", re.MULTILINE)


@pytest.mark.system
def test_sigterm_finishes_the_delivery_in_hand_and_exits_zero(
    start_server: ServerFactory, start_worker: WorkerFactory, database_url: str, report: ReportFn
) -> None:
    started = time.monotonic()
    server = start_server(database_url, receiver="block-once", workers=2, dispatch="deferred")
    run = uuid.uuid4().hex[:12]
    callbacks = [signed("igv", run + "a"), signed("sud", run + "b")]
    answers = [server.post(cb) for cb in callbacks]
    assert all_success(callbacks, answers) == []
    assert {d.status for d in server.deliveries()} == {"pending"}

    worker = start_worker(server, poll_interval=POLL)
    wait_for(
        lambda: any(pid_file(server, cb).exists() for cb in callbacks),
        "the worker to block in a receiver",
    )
    [in_hand] = [cb for cb in callbacks if pid_file(server, cb).exists()]
    [queued] = [cb for cb in callbacks if cb is not in_hand]
    assert int(pid_file(server, in_hand).read_text()) == worker.pid

    worker.terminate()
    # The signal lands while the receiver is still running: the worker waits for it.
    time.sleep(0.3)
    assert worker.running(), worker.log()
    (server.control / "release").touch()
    exit_code = worker.wait()
    assert exit_code == 0, worker.log()

    done = delivery(server, in_hand)
    assert (done.status, done.attempts, done.error) == ("done", 1, None)
    assert [e.note for e in effects_of(server, in_hand)] == ["first attempt"]
    # Stopping means taking no new delivery: the other one is still waiting.
    waiting = delivery(server, queued)
    assert (waiting.status, waiting.attempts) == ("pending", 0)
    assert effects_of(server, queued) == []
    assert worker_errors([worker.log()]) == []

    once = flask_command(server.settings, "orderhooks", "worker", "--once")
    assert once.returncode == 0, once.stdout + once.stderr
    counts = _DISPATCHED.search(once.stdout)
    assert counts is not None, once.stdout
    assert (int(counts[1]), int(counts[2])) == (1, 0)
    after = delivery(server, queued)
    assert (after.status, after.attempts) == ("done", 1)
    assert len(effects_of(server, queued)) == 1
    report(
        f"{backend_name(database_url)} + 1 worker, deferred: sigterm_during_receiver "
        f"exit={exit_code} in_hand={done.status} queued_after_stop={waiting.status} "
        f"then_once={counts[0]!r} runtime={time.monotonic() - started:.1f}s"
    )
