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

from flask_orderhooks.testing import SignedCallback

from .callbacks import mixed
from .conftest import ReportFn, ServerFactory
from .support import Answer, Server, form, is_busy, post, resend_until_success, status_counts


@dataclass(frozen=True)
class StormResult:
    answers: list[Answer]
    busy: list[SignedCallback]
    reasons: Counter[str]
    resends: int
    dispatches: Counter[tuple[str, str, str]]
    seconds: float

    def line(self, label: str, keys: int, copies: int) -> str:
        return (
            f"{label}: keys={keys} copies={copies} requests={len(self.answers)} "
            f"dispatches={sum(self.dispatches.values())} answers={status_counts(self.answers)} "
            f"busy_reasons={dict(self.reasons)} busy_resent={len(self.busy)} "
            f"resends={self.resends} runtime={self.seconds:.1f}s"
        )


def storm(server: Server, callbacks: list[SignedCallback], copies: int, threads: int) -> StormResult:
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
    # What the platform does with a busy answer: send it again.
    resends = sum(resend_until_success(server.port, cb)[0] for cb in busy)
    dispatches = Counter((e.provider, e.callback, e.key) for e in server.effects())
    return StormResult(
        answers, busy, reasons, resends, dispatches, time.monotonic() - started
    )


def check_exactly_once(server: Server, callbacks: list[SignedCallback], result: StormResult) -> None:
    expected = {(cb.provider, cb.callback, cb.key) for cb in callbacks}
    assert len(expected) == len(callbacks)
    assert set(result.dispatches) == expected
    assert [k for k, n in result.dispatches.items() if n != 1] == []
    assert sum(result.dispatches.values()) == len(callbacks)
    deliveries = server.deliveries()
    assert {(d.provider, d.callback, d.key) for d in deliveries} == expected
    assert Counter(d.status for d in deliveries) == {"done": len(callbacks)}
    # Nothing failed and no lease ran out: every key was claimed exactly once.
    assert Counter(d.attempts for d in deliveries) == {1: len(callbacks)}


@dataclass(frozen=True)
class Profile:
    """How hard the duplicates fight: the default waits with instant
    receivers, or slow receivers with almost no duplicate wait, so that many
    duplicates get the busy answer and must be resent."""

    name: str
    duplicate_wait: float | None
    receiver_delay: float | None


DEFAULT = Profile("default waits", None, None)
CONTENDED = Profile("receiver 30 ms, duplicate wait 10 ms", 0.01, 0.03)


@pytest.mark.system
@pytest.mark.postgres
def test_duplicate_storm_on_postgresql(
    start_server: ServerFactory, pg_url: str, report: ReportFn
) -> None:
    keys, copies = 200, 20
    server = start_server(pg_url, workers=4, threads=4)
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    result = storm(server, callbacks, copies, threads=24)
    report(result.line(f"postgresql gthread 4x4, 24 clients, {DEFAULT.name}", keys, copies))
    assert len(result.answers) == keys * copies
    check_exactly_once(server, callbacks, result)


@pytest.mark.system
@pytest.mark.postgres
def test_contended_duplicate_storm_on_postgresql(
    start_server: ServerFactory, pg_url: str, report: ReportFn
) -> None:
    keys, copies = 80, 10
    server = start_server(
        pg_url,
        workers=4,
        threads=4,
        duplicate_wait=CONTENDED.duplicate_wait,
        receiver_delay=CONTENDED.receiver_delay,
    )
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    result = storm(server, callbacks, copies, threads=16)
    report(result.line(f"postgresql gthread 4x4, 16 clients, {CONTENDED.name}", keys, copies))
    assert len(result.answers) == keys * copies
    # The point of this profile: the busy path and its resends really ran.
    assert result.busy
    check_exactly_once(server, callbacks, result)


@pytest.mark.system
@pytest.mark.parametrize("profile", [DEFAULT, CONTENDED], ids=["default", "contended"])
def test_duplicate_storm_on_sqlite_wal(
    start_server: ServerFactory, sqlite_url: str, report: ReportFn, profile: Profile
) -> None:
    keys, copies = 60, 10
    server = start_server(
        sqlite_url,
        workers=4,
        threads=4,
        duplicate_wait=profile.duplicate_wait,
        receiver_delay=profile.receiver_delay,
    )
    callbacks = mixed(keys, uuid.uuid4().hex[:12])
    result = storm(server, callbacks, copies, threads=16)
    log = server.log()
    report(
        result.line(f"sqlite WAL gthread 4x4, 16 clients, {profile.name}", keys, copies)
        + f" locked_log_lines={log.count('store busy')}"
    )
    assert len(result.answers) == keys * copies
    if profile is CONTENDED:
        assert result.busy
    # "database is locked" must only ever have become a 503 (resent above),
    # never a success without the effect, nor a lost delivery.
    check_exactly_once(server, callbacks, result)
