"""``flask orderhooks purge`` while callbacks flow (issue #15, point 2).

The store is filled with old done deliveries: gateway ones, whose signature
carries no timestamp and can be replayed for ever (purge must compact them
to tombstones), and iGV and SUD ones signed longer ago than their windows
(purge deletes them: a replay is refused by its timestamp). Then, against a
gunicorn server, ``flask orderhooks purge`` runs in a subprocess while a
storm goes on: resends of the old deliveries being purged (the same signed
bodies), duplicates of fresh deliveries, and fresh first deliveries.

What must hold: no answer is a 5xx (purge never makes a live callback wait
past ORDERHOOKS_DUPLICATE_WAIT); receivers ran exactly once per fresh
delivery and never for a replay; every old gateway row is a tombstone with
its digest; every old iGV/SUD row is gone, as many as purge reported; no
fresh delivery is lost.

The batches' bounds are shown in process (``test_purge_batches_skip_a_held_row``):
purge with a batch of 50 commits once per batch, and on PostgreSQL and
MariaDB it finishes while a live transaction holds one of its rows locked,
leaving that row for a later run, which takes it. And one batch locks only
the rows it purges (``test_a_batch_locks_only_the_rows_it_purges``): while a
batch is held open, a replay of an older gateway tombstone and a fresh
delivery are answered at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from flask_orderhooks.store.retention import compact_old, delete_old
from flask_orderhooks.store.table import deliveries_table, text_of
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_changed,
)
from tests.conftest import GATEWAY_KEYS, IGV_SECRET, SUD_APP_ID, SUD_APPS

from . import server_app
from .callbacks import mixed
from .conftest import MARIADB, POSTGRESQL, URL_FIXTURES, ReportFn, ServerFactory
from .support import (
    FLASK_COMMAND,
    ROOT,
    Answer,
    Server,
    backend_name,
    form,
    post,
    prepare_database,
    status_counts,
)

#: How old the old deliveries are, and the age purge is given.
OLD = timedelta(days=40)
PURGE_AGE = "30d"
#: Old deliveries stored before the storm: half gateway (compacted), a
#: quarter iGV and a quarter SUD (deleted).
OLD_GATEWAY = 4_000
OLD_IGV = 2_000
OLD_SUD = 2_000
#: Fresh deliveries sent during the storm, each ``COPIES`` times in a row.
FRESH = 300
COPIES = 3
#: Resends of old deliveries during the storm (the list cycles while purge runs).
REPLAYS_GATEWAY = 900
REPLAYS_TIMED = 300
CLIENTS = 16
#: Bounds on waits, never asserted as timings.
PURGE_TIMEOUT = 120.0
STORM_LIMIT = 90.0

_REPORTED = re.compile(
    r"^Deleted (\d+) and compacted (\d+) deliveries older than (\S+) \(([^)]*)\)\.$"
)


# -- old deliveries, stored directly ---------------------------------------------


def old_callbacks(run: str, signed_at: datetime) -> list[SignedCallback]:
    """The old deliveries' callbacks, as the platforms signed them then."""
    ms = int(signed_at.timestamp() * 1000)
    key = GATEWAY_KEYS["10001"]
    callbacks: list[SignedCallback] = []
    for i in range(OLD_GATEWAY):
        if i % 2:
            callbacks.append(gateway_payout(key, id=f"OP{run}{i:05d}", trans_id=f"OW{run}{i}"))
        else:
            callbacks.append(gateway_collect(key, id=f"OC{run}{i:05d}", trans_id=f"OT{run}{i}"))
    callbacks += [
        igv_order_status(IGV_SECRET, request_id=f"OR{run}{i:05d}", timestamp_ms=ms + i)
        for i in range(OLD_IGV)
    ]
    callbacks += [
        sud_order_changed(
            SUD_APPS[SUD_APP_ID],
            app_id=SUD_APP_ID,
            notify_id=f"ON{run}{i:05d}",
            timestamp_ms=ms + i,
        )
        for i in range(OLD_SUD)
    ]
    return callbacks


def _when(value: datetime, dialect: str) -> datetime:
    # MySQL's DATETIME and SQLite keep naive UTC (the store binds them so).
    return value if dialect == "postgresql" else value.astimezone(UTC).replace(tzinfo=None)


def store_done(engine: sa.Engine, callbacks: list[SignedCallback], at: datetime) -> None:
    """Insert ``callbacks`` as done deliveries last updated around ``at``
    (one millisecond apart, so purge's batches walk through them in order)."""
    table = deliveries_table(sa.MetaData())
    dialect = engine.dialect.name
    rows = []
    for i, cb in enumerate(callbacks):
        when = _when(at + timedelta(milliseconds=i), dialect)
        rows.append(
            {
                "provider": cb.provider,
                "callback": cb.callback,
                "key": cb.key,
                "status": "done",
                "attempts": 1,
                "claim_token": secrets.token_hex(16),
                "lease_expires_at": when,
                "body": cb.body,
                "body_sha256": hashlib.sha256(cb.body).hexdigest(),
                "headers": json.dumps(dict(cb.headers), sort_keys=True),
                "error": None,
                "created_at": when,
                "updated_at": when,
                "next_attempt_at": None,
                "reference": None,
                "failures": None,
                "compacted_at": None,
            }
        )
    with engine.begin() as connection:
        for start in range(0, len(rows), 2000):
            connection.execute(table.insert(), rows[start : start + 2000])


@dataclass(frozen=True)
class Row:
    key: str
    status: str
    body: bytes
    headers: str
    digest: str
    compacted: bool


def stored_rows(engine: sa.Engine) -> dict[tuple[str, str, str], Row]:
    t = deliveries_table(sa.MetaData())
    query = sa.select(
        t.c.provider, t.c.callback, t.c.key, t.c.status, t.c.body, t.c.headers,
        t.c.body_sha256, t.c.compacted_at,
    )  # fmt: skip
    with engine.connect() as connection:
        return {
            (r.provider, r.callback, text_of(r.key) or ""): Row(
                key=text_of(r.key) or "",
                status=r.status,
                body=bytes(r.body),
                headers=r.headers,
                digest=r.body_sha256,
                compacted=r.compacted_at is not None,
            )
            for r in connection.execute(query)
        }


def effect_counts(engine: sa.Engine) -> Counter[tuple[str, str, str]]:
    t = server_app.Effect.__table__
    with engine.connect() as connection:
        rows = connection.execute(sa.select(t.c.provider, t.c.callback, t.c.key)).all()
    return Counter((r.provider, r.callback, r.key) for r in rows)


def name(cb: SignedCallback) -> tuple[str, str, str]:
    return cb.provider, cb.callback, cb.key


# -- the purge subprocess and what can be seen of its transactions ---------------


def purge_process(settings: dict[str, str], url: str, log: Any) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **settings,
        server_app.DATABASE_URL: url,
        server_app.TIME_LOCKS: "1",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [*FLASK_COMMAND, "orderhooks", "purge", "--older-than", PURGE_AGE],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )


@dataclass
class LockWaitWatch:
    """Samples, from the server's catalog, the live callbacks' row-lock
    waits, each timed by its statement's age (an upper bound on its wait).
    PostgreSQL: the server's connections, by ``application_name``; MariaDB:
    transactions of this test's database in ``LOCK WAIT`` holding few locks
    (a purge batch holds more). What it sees is reported, never asserted:
    sampling may miss a wait.

    Not ``innodb_trx.trx_wait_started`` on MariaDB: on 10.11 it was seen
    seconds stale (a callback "waiting" 13 s in a statement 3 ms old, under a
    3 s lock-wait bound), so there the statement's age is the processlist's
    ``time_ms``. How long purge's transactions held their locks, the purge
    process reports itself (``server_app.time_lock_holds``).
    """

    engine: sa.Engine | None
    query: sa.TextClause | None = None
    params: dict[str, Any] = field(default_factory=dict)
    waits: set[str] = field(default_factory=set)
    longest: float = 0.0
    longest_what: str = ""
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def of(cls, url: str, server_app_name: str) -> LockWaitWatch:
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        if backend == "postgresql":
            return cls(
                sa.create_engine(parsed.difference_update_query(["options"])),
                sa.text(
                    "SELECT pid::text || ' ' || query_start::text,"
                    " EXTRACT(EPOCH FROM clock_timestamp() - query_start), LEFT(query, 160)"
                    " FROM pg_stat_activity"
                    " WHERE application_name = :server AND wait_event_type = 'Lock'"
                ),
                {"server": server_app_name},
            )
        if backend == "mysql":
            return cls(
                sa.create_engine(parsed),
                sa.text(
                    "SELECT t.trx_id, p.time_ms / 1000,"
                    " CONCAT('rows locked ', t.trx_rows_locked, ': ', LEFT(t.trx_query, 160))"
                    " FROM information_schema.innodb_trx t"
                    " JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id"
                    " WHERE p.db = :db AND t.trx_state = 'LOCK WAIT'"
                    " AND t.trx_rows_locked <= 20"
                ),
                {"db": parsed.database},
            )
        return cls(None)

    def start(self) -> None:
        if self.engine is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.engine is not None and self.query is not None
        with self.engine.connect() as connection:
            while not self._stop.is_set():
                for ident, age, *what in connection.execute(self.query, self.params):
                    self.waits.add(str(ident))
                    if float(age or 0) > self.longest:
                        self.longest_what = " ".join(map(str, what))
                    self.longest = max(self.longest, float(age or 0))
                connection.rollback()
                self.samples += 1
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.engine is not None:
            self.engine.dispose()

    def line(self) -> str:
        if self.engine is None:
            return "lock waits: not visible on SQLite"
        return (
            f"{self.samples} samples: callbacks seen waiting for a row lock={len(self.waits)} "
            f"longest wait seen={self.longest * 1000:.0f}ms {self.longest_what}"
        )


def lock_holds(log: str) -> str:
    """What the purge process said of its transactions' lock holds."""
    found = server_app.LOCK_HOLDS.search(log)
    if found is None:
        return "purge's lock holds: not reported"
    return f"purge: {found[1]} transactions held row locks, the longest {found[2]} ms"


def with_application_name(url: str, application: str) -> str:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.update_query_dict({"application_name": application}).render_as_string(
        hide_password=False
    )


# -- the storm ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    callback: SignedCallback
    kind: str  # "fresh", "replay-gateway" or "replay-timed"
    answer: Answer
    during_purge: bool


def storm(
    server: Server,
    jobs: list[tuple[str, SignedCallback]],
    extra: list[tuple[str, SignedCallback]],
    purge_started: threading.Event,
    purge_running: threading.Event,
    start_purge_after: int,
    on_start: Any,
) -> list[Sent]:
    """Send ``jobs`` from ``CLIENTS`` threads; start purge once
    ``start_purge_after`` were answered; while purge still runs after the
    last job, keep resending ``extra`` (old deliveries) so that traffic
    covers the whole purge."""
    lock = threading.Lock()
    pending = iter(jobs)
    cycling = iter(extra * 50)
    results: list[Sent] = []
    deadline = time.monotonic() + STORM_LIMIT

    def next_job() -> tuple[str, SignedCallback] | None:
        with lock:
            job = next(pending, None)
            if job is not None:
                return job
            if purge_running.is_set() or not purge_started.is_set():
                return next(cycling, None) if time.monotonic() < deadline else None
            return None

    def client() -> None:
        while (job := next_job()) is not None:
            kind, cb = job
            during = purge_running.is_set()
            answer = post(server.port, cb)
            during = during and purge_running.is_set()
            with lock:
                results.append(Sent(cb, kind, answer, during))
                if len(results) == start_purge_after and not purge_started.is_set():
                    on_start()

    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client) for _ in range(CLIENTS)]:
            future.result()
    return results


def storm_jobs(
    fresh: list[SignedCallback], old: list[SignedCallback], rng: random.Random
) -> tuple[list[tuple[str, SignedCallback]], list[tuple[str, SignedCallback]]]:
    gateway = [cb for cb in old if cb.provider == "gateway"]
    timed = [cb for cb in old if cb.provider != "gateway"]
    replays = [("replay-gateway", cb) for cb in rng.sample(gateway, REPLAYS_GATEWAY)]
    replays += [("replay-timed", cb) for cb in rng.sample(timed, REPLAYS_TIMED)]
    # Every copy of a fresh delivery is queued next to the others: they race.
    groups: list[list[tuple[str, SignedCallback]]] = [[("fresh", cb)] * COPIES for cb in fresh]
    groups += [[job] for job in replays]
    rng.shuffle(groups)
    extra = [("replay-gateway", cb) for cb in rng.sample(gateway, 200)]
    extra += [("replay-timed", cb) for cb in rng.sample(timed, 50)]
    return [job for group in groups for job in group], extra


# Not SQLite: it has one writer, so any batch holds off every other write for
# the few milliseconds of its statement; there is no row lock to skip.
@pytest.fixture(params=[POSTGRESQL, MARIADB])
def any_url(request: pytest.FixtureRequest) -> str:
    """A database of the test's own on each backend."""
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


@pytest.mark.system
def test_purge_during_a_duplicate_storm(
    start_server: ServerFactory, any_url: str, report: ReportFn, tmp_path: Any
) -> None:
    backend = backend_name(any_url)
    run = uuid.uuid4().hex[:8]
    server_app_name = f"orderhooks_server_{run}"
    server = start_server(with_application_name(any_url, server_app_name), workers=4, threads=4)
    engine = sa.create_engine(any_url)
    try:
        old_at = datetime.now(UTC) - OLD
        old = old_callbacks(run, old_at)
        store_done(engine, old, old_at)
        old_gateway = {name(cb): cb for cb in old if cb.provider == "gateway"}
        old_timed = {name(cb): cb for cb in old if cb.provider != "gateway"}
        fresh = mixed(FRESH, f"F{run}")
        rng = random.Random(run)
        jobs, extra = storm_jobs(fresh, old, rng)

        watch = LockWaitWatch.of(any_url, server_app_name)
        purge_started, purge_running = threading.Event(), threading.Event()
        processes: list[subprocess.Popen[str]] = []
        log = (tmp_path / "purge.log").open("w")

        def waiter(process: subprocess.Popen[str]) -> None:
            process.wait(PURGE_TIMEOUT)
            purge_running.clear()

        def start_purge() -> None:
            purge_running.set()
            purge_started.set()
            watch.start()
            process = purge_process(server.settings, any_url, log)
            processes.append(process)
            threading.Thread(target=waiter, args=(process,), daemon=True).start()

        try:
            sent = storm(server, jobs, extra, purge_started, purge_running, len(jobs) // 10,
                         start_purge)  # fmt: skip
            purge = processes[0]
            output, _ = purge.communicate(timeout=PURGE_TIMEOUT)
        finally:
            watch.stop()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            log.close()
        purge_log = (tmp_path / "purge.log").read_text("utf-8", "replace")
        assert purge.returncode == 0, output + purge_log

        # After purge: the tombstones still answer the gateway's replays.
        after = [
            Sent(cb, "replay-gateway", post(server.port, cb), False)
            for cb in rng.sample(list(old_gateway.values()), 100)
        ]
        sent += after

        lines = output.splitlines()
        reported = _REPORTED.match(lines[0])
        assert reported is not None, output
        deleted, compacted = int(reported[1]), int(reported[2])
        assert reported[3] == PURGE_AGE and reported[4] == "done"
        # A row a live callback held when its batch came was skipped, not
        # waited for: the next run takes it. Both runs' reports add up to
        # what the store holds.
        with (tmp_path / "purge-again.log").open("w") as again_log:
            again = purge_process(server.settings, any_url, again_log)
            again_output, _ = again.communicate(timeout=PURGE_TIMEOUT)
        assert again.returncode == 0, again_output
        second = _REPORTED.match(again_output.splitlines()[0])
        assert second is not None, again_output
        skipped = (int(second[1]), int(second[2]))
        deleted, compacted = deleted + skipped[0], compacted + skipped[1]

        # -- every answer -----------------------------------------------------------
        wrong: list[tuple[str, str, int, str]] = []
        for s in sent:
            kind, detail = form(s.callback.provider, s.answer)
            if s.kind in ("fresh", "replay-gateway"):
                ok = kind == "success" and s.answer.status == 200
            else:
                # A signature older than its window is refused: a 4xx in the
                # platform's failure form, whether or not the row is still there.
                ok = kind == "failure" and 400 <= s.answer.status < 500
            if not ok:
                wrong.append((s.kind, s.callback.key, s.answer.status, detail))
        assert wrong == []
        assert [s for s in sent if s.answer.status >= 500] == []

        # -- receivers: once per fresh delivery, never for a replay -----------------
        effects = effect_counts(engine)
        assert effects == Counter({name(cb): 1 for cb in fresh})

        # -- the store ---------------------------------------------------------------
        rows = stored_rows(engine)
        for key, cb in old_gateway.items():
            row = rows.get(key)
            assert row is not None, f"old gateway delivery {key} lost"
            assert (row.status, row.body, row.headers, row.compacted) == ("done", b"", "{}", True)
            assert row.digest == hashlib.sha256(cb.body).hexdigest()
        assert [key for key in old_timed if key in rows] == []
        assert (deleted, compacted) == (len(old_timed), len(old_gateway))
        assert sum(r.compacted for r in rows.values()) == compacted
        fresh_rows = {key: rows.get(key) for key in map(name, fresh)}
        statuses = {k: (r.status if r else None) for k, r in fresh_rows.items()}
        assert statuses == dict.fromkeys(fresh_rows, "done")
        assert len(rows) == len(old_gateway) + len(fresh)

        by_kind = Counter(s.kind for s in sent)
        during = Counter(s.kind for s in sent if s.during_purge)
        report(
            f"{backend}: old={len(old)} deleted={deleted} compacted={compacted} "
            f"(of which the second run: {skipped[0]} deleted, {skipped[1]} compacted) "
            f"requests={len(sent)} {dict(by_kind)} "
            f"answers={status_counts([s.answer for s in sent])}"
            f" during_purge={dict(during)} fresh={len(fresh)}x{COPIES} effects="
            f"{sum(effects.values())}; {lock_holds(purge_log)}; {watch.line()}"
        )
        # Traffic flowed while purge ran (behaviour, not a timing).
        assert during["replay-gateway"] > 0 and during["fresh"] + during["replay-timed"] > 0
    finally:
        engine.dispose()


# -- bounded batches, in process ---------------------------------------------------


HELD_BATCH = 50
HELD_ROWS = 1_000


@contextlib.contextmanager
def held(engine: sa.Engine, cb: SignedCallback) -> Iterator[None]:
    """A transaction holding ``cb``'s row locked, as a live callback's claim
    (ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE) locks a done row."""
    t = deliveries_table(sa.MetaData())
    with engine.connect() as connection, connection.begin():
        locked = connection.execute(
            sa.select(t.c.key)
            .where(t.c.provider == cb.provider, t.c.callback == cb.callback, t.c.key == cb.key)
            .with_for_update()
        ).all()
        assert len(locked) == 1
        yield


def _in_thread(target: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(target())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.system
def test_purge_batches_skip_a_held_row(any_url: str, report: ReportFn) -> None:
    backend = backend_name(any_url)
    settings = {
        server_app.DATABASE_URL: any_url,
        "ORDERHOOKS_IGV_SECRET": json.dumps(IGV_SECRET),
        "ORDERHOOKS_GATEWAY_KEY": json.dumps(GATEWAY_KEYS),
        "ORDERHOOKS_SUD_APPS": json.dumps(SUD_APPS),
    }
    # The tables, and WAL on SQLite, as every system test's server has them.
    prepare_database(settings)
    app, db, hooks = server_app.build_app(settings, connect_receivers=False)
    engine = sa.create_engine(any_url)
    try:
        with app.app_context():
            store = hooks.state(app).store
            run = uuid.uuid4().hex[:8]
            old_at = datetime.now(UTC) - OLD
            ms = int(old_at.timestamp() * 1000)
            igv = [
                igv_order_status(IGV_SECRET, request_id=f"H{run}{i:05d}", timestamp_ms=ms + i)
                for i in range(HELD_ROWS)
            ]
            gateway = [
                gateway_collect(GATEWAY_KEYS["10001"], id=f"HC{run}{i:05d}")
                for i in range(HELD_ROWS)
            ]
            store_done(engine, igv, old_at)
            store_done(engine, gateway, old_at)
            cutoff = datetime.now(UTC) - timedelta(days=30)
            commits: Counter[int] = Counter()

            def count_commit(_connection: Any) -> None:
                commits[threading.get_ident()] += 1

            sa.event.listen(store.engine, "commit", count_commit)
            locks = backend != "sqlite"
            held_igv, held_gateway = igv[HELD_ROWS // 2], gateway[HELD_ROWS // 3]

            def purge_igv() -> tuple[int, int]:
                before = commits[threading.get_ident()]
                with app.app_context():
                    n = delete_old(
                        store, older_than=cutoff, statuses=("done",), provider="igv",
                        batch=HELD_BATCH,
                    )  # fmt: skip
                return n, commits[threading.get_ident()] - before

            def compact_gateway() -> tuple[int, int]:
                before = commits[threading.get_ident()]
                with app.app_context():
                    n = compact_old(
                        store, older_than=cutoff, provider="gateway",
                        now=datetime.now(UTC), batch=HELD_BATCH,
                    )  # fmt: skip
                return n, commits[threading.get_ident()] - before

            results = {}
            for label, work, row in (
                ("delete", purge_igv, held_igv),
                ("compact", compact_gateway, held_gateway),
            ):
                with held(engine, row) if locks else contextlib.nullcontext():
                    thread, box = _in_thread(work)
                    thread.join(PURGE_TIMEOUT)
                    # Purge finished while the row was (on PostgreSQL and
                    # MariaDB) still held locked: it skipped it, waited for nothing.
                    assert not thread.is_alive(), f"{label} waited for the held row"
                assert len(box) == 1 and not isinstance(box[0], BaseException), box
                taken, batches = box[0]
                skipped = 1 if locks else 0
                assert taken == HELD_ROWS - skipped
                # One commit per batch of at most 50 rows: 999 rows, 20 batches
                # (an exact multiple would end with one empty batch).
                # The rows each batch considers: on PostgreSQL the pick skips
                # the held row; on MariaDB it is a candidate, skipped when
                # the batch locks its rows by primary key.
                considered = HELD_ROWS if backend == "mariadb" else HELD_ROWS - skipped
                expected = -(-considered // HELD_BATCH)
                if considered % HELD_BATCH == 0:
                    expected += 1
                assert batches == expected
                # The row that was held is taken by the next run.
                thread, box = _in_thread(work)
                thread.join(PURGE_TIMEOUT)
                assert not thread.is_alive()
                assert box[0][0] == skipped
                results[label] = (taken, batches, skipped)

            rows = stored_rows(engine)
            assert [k for k in rows if k[0] == "igv"] == []
            tombstones = [r for k, r in rows.items() if k[0] == "gateway"]
            assert len(tombstones) == HELD_ROWS
            assert all(r.compacted and r.body == b"" for r in tombstones)
            sa.event.remove(store.engine, "commit", count_commit)
            report(
                f"{backend}: batch={HELD_BATCH}; delete took {results['delete'][0]} rows in "
                f"{results['delete'][1]} commits, compact {results['compact'][0]} in "
                f"{results['compact'][1]}; held rows skipped and taken by the next run: "
                f"{results['delete'][2] + results['compact'][2]}"
            )
    finally:
        with app.app_context():
            db.engine.dispose()
        engine.dispose()


# -- what one batch locks ------------------------------------------------------------


# Not SQLite: it has one writer, so any batch holds off every other write for
# the few milliseconds of its statement (the storm test covers it).
@pytest.fixture(params=[POSTGRESQL, MARIADB])
def batch_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(URL_FIXTURES[request.param]))


@pytest.mark.system
def test_a_batch_locks_only_the_rows_it_purges(batch_url: str, report: ReportFn) -> None:
    """While one batch deleting iGV rows is held open between its pick and
    its write (as a slow batch would be), a replay of a gateway tombstone
    older than those rows, and a fresh delivery, are answered at once."""
    backend = backend_name(batch_url)
    settings = {
        server_app.DATABASE_URL: batch_url,
        "ORDERHOOKS_IGV_SECRET": json.dumps(IGV_SECRET),
        "ORDERHOOKS_GATEWAY_KEY": json.dumps(GATEWAY_KEYS),
        "ORDERHOOKS_SUD_APPS": json.dumps(SUD_APPS),
        "ORDERHOOKS_DUPLICATE_WAIT": "1.0",
    }
    prepare_database(settings)
    app, db, hooks = server_app.build_app(settings)
    engine = sa.create_engine(batch_url)
    try:
        with app.app_context():
            store = hooks.state(app).store
            run = uuid.uuid4().hex[:8]
            old_at = datetime.now(UTC) - OLD
            ms = int(old_at.timestamp() * 1000)
            gateway = [
                gateway_collect(GATEWAY_KEYS["10001"], id=f"BC{run}{i:04d}") for i in range(200)
            ]
            igv = [
                igv_order_status(IGV_SECRET, request_id=f"BR{run}{i:04d}", timestamp_ms=ms + i)
                for i in range(200)
            ]
            store_done(engine, gateway, old_at)
            # Newer than every gateway row: the iGV batch's scan passes them.
            store_done(engine, igv, old_at + timedelta(minutes=10))
            cutoff = datetime.now(UTC) - timedelta(days=30)
            assert store.compact(older_than=cutoff, provider="gateway") == len(gateway)

            picked, release = threading.Event(), threading.Event()
            purger: list[int] = []

            def pause_after_pick(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
                # The batch's locking statement: on MySQL its lock of the
                # picked rows, on PostgreSQL its pick-and-write. Its locks are
                # held until the batch commits, after this pause.
                pick = "FOR UPDATE" in statement.upper()
                if threading.get_ident() in purger and pick and not picked.is_set():
                    picked.set()
                    release.wait(PURGE_TIMEOUT)

            def purge() -> int:
                purger.append(threading.get_ident())
                with app.app_context():
                    return delete_old(
                        store, older_than=cutoff, statuses=("done",), provider="igv", batch=50
                    )

            sa.event.listen(store.engine, "after_cursor_execute", pause_after_pick)
            thread, box = _in_thread(purge)
            try:
                assert picked.wait(PURGE_TIMEOUT)
                client = app.test_client()
                replay, fresh = gateway[0], mixed(1, f"B{run}")[0]
                answers = {}
                for label, cb in (("replay", replay), ("fresh", fresh)):
                    response = client.post(cb.url(), data=cb.body, headers=cb.headers)
                    answers[label] = (response.status_code, response.get_data(as_text=True))
                # Answered while the batch was still open.
                assert not release.is_set() and thread.is_alive()
            finally:
                release.set()
                thread.join(PURGE_TIMEOUT)
                sa.event.remove(store.engine, "after_cursor_execute", pause_after_pick)
            assert box == [len(igv)]
            report(f"{backend}: answers while one iGV batch was open: {answers}")
            assert answers["replay"][0] == 200 and answers["fresh"][0] == 200, answers
            assert effect_counts(engine) == Counter({name(fresh): 1})
    finally:
        with app.app_context():
            db.engine.dispose()
        engine.dispose()
