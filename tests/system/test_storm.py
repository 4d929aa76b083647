"""Duplicate storms against real gunicorn workers: exactly one dispatch per key.

Every copy of a key is queued next to the others, so that with more client
threads than copies all of them are in flight at once across the workers:
the most duplicates racing for the same key that the server can hold.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from flask_orderhooks.store.statements import LEASE_LOST
from flask_orderhooks.testing import SignedCallback

from .callbacks import mixed
from .conftest import ReportFn, ServerFactory
from .support import (
    Answer,
    Server,
    backend_name,
    form,
    is_busy,
    post,
    resend_until_success,
    status_counts,
)


@dataclass(frozen=True)
class StormResult:
    answers: list[Answer]
    busy: list[SignedCallback]
    reasons: Counter[str]
    stranded: int
    resends: int
    dispatches: Counter[tuple[str, str, str]]
    seconds: float

    def line(self, label: str, keys: int, copies: int) -> str:
        return (
            f"{label}: keys={keys} copies={copies} requests={len(self.answers)} "
            f"dispatches={sum(self.dispatches.values())} answers={status_counts(self.answers)} "
            f"busy_reasons={dict(self.reasons)} busy_resent={len(self.busy)} "
            f"stranded_claims={self.stranded} "
            f"resends={self.resends} runtime={self.seconds:.1f}s"
        )


def storm(
    server: Server, callbacks: list[SignedCallback], copies: int, threads: int
) -> StormResult:
    started = time.monotonic()
    jobs = [cb for cb in callbacks for _ in range(copies)]
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(lambda cb: post(server.port, cb), jobs))
    foreign = [
        (cb.provider, cb.key, form(cb.provider, a)[1])
        for cb, a in zip(jobs, answers, strict=True)
        if form(cb.provider, a)[0] == "foreign"
    ]
    assert foreign == []
    wrong = [
        (cb.provider, cb.key, a)
        for cb, a in zip(jobs, answers, strict=True)
        if form(cb.provider, a)[0] != "success" and not is_busy(cb.provider, a)
    ]
    # Only success or "busy, retry": no 500, no 409, no "store unavailable".
    assert wrong == []
    busy = [cb for cb, a in zip(jobs, answers, strict=True) if is_busy(cb.provider, a)]
    reasons = Counter(
        form(cb.provider, a)[1] or "(gateway: fail)"
        for cb, a in zip(jobs, answers, strict=True)
        if is_busy(cb.provider, a)
    )
    # Every request has been answered, so no worker is dispatching anything:
    # a delivery still "processing" was claimed and then left behind, and
    # only its lease running out lets a resend take it.
    stranded = sum(d.status == "processing" for d in server.deliveries())
    # What the platform does with a busy answer: send it again.
    resends = sum(resend_until_success(server.port, cb)[0] for cb in busy)
    dispatches = Counter((e.provider, e.callback, e.key) for e in server.effects())
    return StormResult(
        answers, busy, reasons, stranded, resends, dispatches, time.monotonic() - started
    )


def check_exactly_once(
    server: Server, callbacks: list[SignedCallback], result: StormResult, *, lease_retakes: bool
) -> int:
    """Assert one committed dispatch and one ``done`` delivery per key.

    :param lease_retakes: a claim left behind by a store error may have been
        taken again (a second attempt); otherwise every key took exactly one.
    :returns: how many deliveries took more than one attempt.
    """
    expected = {(cb.provider, cb.callback, cb.key) for cb in callbacks}
    assert len(expected) == len(callbacks)
    assert set(result.dispatches) == expected
    assert [k for k, n in result.dispatches.items() if n != 1] == []
    assert sum(result.dispatches.values()) == len(callbacks)
    deliveries = server.deliveries()
    assert {(d.provider, d.callback, d.key) for d in deliveries} == expected
    assert Counter(d.status for d in deliveries) == {"done": len(callbacks)}
    errors = [d.error for d in deliveries if d.error is not None]
    retaken = sum(d.attempts > 1 for d in deliveries)
    if lease_retakes:
        # No receiver fails in a storm: only a store error may be on record,
        # or the lost attempt of a claim left behind, which a resend took
        # over once its lease ran out (one per delivery taken again).
        assert [e for e in errors if not e.startswith("OperationalError") and e != LEASE_LOST] == []
        assert sum(e == LEASE_LOST for e in errors) <= retaken
    else:
        assert errors == []
        assert Counter(d.attempts for d in deliveries) == {1: len(callbacks)}
    return retaken


@dataclass(frozen=True)
class Profile:
    """How hard the duplicates fight.

    ``default``: the library's waits and instant receivers. ``contended``:
    receivers that hold their transaction 30 ms, a 10 ms duplicate wait and
    20 ms between a claim and its dispatch (on SQLite a duplicate otherwise
    waits behind the dispatch's write lock and only meets a claimed, unlocked
    delivery in a window one statement wide), so that many duplicates get the
    busy answer and must be resent. ``contended+locked`` (SQLite): the same
    receivers and duplicate wait, no dispatch delay, a 20 ms busy timeout, so
    that "database is locked" really happens, and a 2 s lease, so that a claim
    left behind by it is retaken within the resends.
    """

    name: str
    duplicate_wait: float | None = None
    receiver_delay: float | None = None
    sqlite_timeout: float | None = None
    claim_timeout: float | None = None
    dispatch_delay: float | None = None


DEFAULT = Profile("default")
CONTENDED = Profile("contended", duplicate_wait=0.01, receiver_delay=0.03, dispatch_delay=0.02)
SQLITE_LOCKED = Profile(
    "contended+locked", duplicate_wait=0.01, receiver_delay=0.03, sqlite_timeout=0.02,
    claim_timeout=2.0,
)  # fmt: skip


def start(start_server: ServerFactory, url: str, profile: Profile) -> Server:
    return start_server(
        url,
        workers=4,
        threads=4,
        duplicate_wait=profile.duplicate_wait,
        receiver_delay=profile.receiver_delay,
        sqlite_timeout=profile.sqlite_timeout,
        claim_timeout=profile.claim_timeout,
        dispatch_delay=profile.dispatch_delay,
    )


@pytest.mark.system
@pytest.mark.parametrize(
    ("profile", "keys", "copies", "clients"),
    [(DEFAULT, 200, 20, 24), (CONTENDED, 80, 10, 16)],
    ids=["default", "contended"],
)
def test_duplicate_storm_on_a_database_server(
    start_server: ServerFactory,
    server_url: str,
    report: ReportFn,
    profile: Profile,
    keys: int,
    copies: int,
    clients: int,
) -> None:
    """PostgreSQL and MariaDB (``server_url``). On MariaDB the duplicate wait
    is ``innodb_lock_wait_timeout``, whole seconds: the contended profile's
    10 ms become 1 s, still far longer than a 30 ms receiver holds the row."""
    server = start(start_server, server_url, profile)
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    result = storm(server, callbacks, copies, threads=clients)
    label = f"{backend_name(server_url)} gthread 4x4, {clients} clients, {profile.name}"
    report(result.line(label, keys, copies))
    assert len(result.answers) == keys * copies
    if profile is CONTENDED:
        # The point of this profile: the busy path and its resends really ran.
        assert result.busy
    # Both wait for the row lock instead of failing: nothing left behind.
    assert result.stranded == 0
    check_exactly_once(server, callbacks, result, lease_retakes=False)


@pytest.mark.system
@pytest.mark.parametrize("profile", [DEFAULT, CONTENDED, SQLITE_LOCKED], ids=lambda p: p.name)
def test_duplicate_storm_on_sqlite_wal(
    start_server: ServerFactory, sqlite_url: str, report: ReportFn, profile: Profile
) -> None:
    keys, copies = 60, 10
    server = start(start_server, sqlite_url, profile)
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    result = storm(server, callbacks, copies, threads=16)
    locked = server.log().count("store busy: OperationalError")
    # "database is locked" only ever became a 503 (resent above): never a
    # success without its effect, never a lost or doubled delivery.
    retaken = check_exactly_once(
        server, callbacks, result, lease_retakes=profile.claim_timeout is not None
    )
    report(
        result.line(f"sqlite WAL gthread 4x4, 16 clients, {profile.name}", keys, copies)
        + f" locked_errors_logged={locked} retaken_after_lease={retaken}"
    )
    assert len(result.answers) == keys * copies
    if profile is not DEFAULT:
        assert result.busy
    if profile is SQLITE_LOCKED:
        assert locked > 0
