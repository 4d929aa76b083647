"""Fixtures of the security suite.

Every app here runs on a frozen clock (``OrderHooks(clock=...)``), so no
test depends on the wall clock, and every app's deliveries table is private
to it (a SQLite file, or a PostgreSQL schema created and dropped here), so
the final check of a :class:`Target` sees exactly the rows its own accepted
requests wrote and nothing from a refused one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from hypothesis import HealthCheck, settings
from sqlalchemy.orm import DeclarativeBase
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import TestResponse

from flask_orderhooks import (
    OrderHooks,
    callback_unhandled,
    game_order_changed,
    order_pending_delivery,
    payment_collected,
    payout_finished,
)
from flask_orderhooks.store import DeliveryStore, StoredDelivery
from flask_orderhooks.testing import SignedCallback
from tests.conftest import private_schema

from .support import (
    DB_PASSWORD,
    GATEWAY_KEYS,
    IGV_SECRET,
    NOW,
    PLATFORM_OF_PATH,
    SUD_APPS,
    Answer,
    answer_of,
    ok,
)

# -- Hypothesis ------------------------------------------------------------------

#: Examples per route: 2,000 in CI; ORDERHOOKS_SECURITY_EXAMPLES changes it
#: for a deeper (or, while editing, a quicker) local run.
EXAMPLES = int(os.environ.get("ORDERHOOKS_SECURITY_EXAMPLES", "2000"))

# Registered, not loaded: loading would change every other test's settings.
settings.register_profile(
    "orderhooks-security",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    # The app is module-scoped on purpose (one table for thousands of
    # examples); the big-body strategies are big on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECURITY_PROFILE = settings.get_profile("orderhooks-security")

SECURITY_CONFIG: dict[str, Any] = {
    "TESTING": True,
    "ORDERHOOKS_IGV_SECRET": IGV_SECRET,
    "ORDERHOOKS_GATEWAY_KEY": GATEWAY_KEYS,
    "ORDERHOOKS_SUD_APPS": SUD_APPS,
}

SIGNALS = {
    "order-pending-delivery": order_pending_delivery,
    "payment-collected": payment_collected,
    "payout-finished": payout_finished,
    "game-order-changed": game_order_changed,
    "callback-unhandled": callback_unhandled,
}


class FixedClock:
    """Unix time that only moves when a test moves it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Captured:
    signal: str
    event: Any


class Recorder:
    """Receives every orderhooks signal of one app; can be told to fail."""

    def __init__(self) -> None:
        self.events: list[Captured] = []
        self.fail_with: BaseException | None = None

    def receiver(self, name: str) -> Callable[..., None]:
        def receive(sender: Flask, *, event: Any, **_: Any) -> None:
            self.events.append(Captured(name, event))
            if self.fail_with is not None:
                raise self.fail_with

        return receive


class _Base(DeclarativeBase):
    pass


Key = tuple[str, str, str]


class Target:
    """One app under attack: posts requests and checks their traces.

    ``refuse`` proves a refused request changed no row and ran no receiver;
    :meth:`final_check` proves the table holds exactly the deliveries that
    were verified, so nothing refused ever got in.
    """

    def __init__(
        self, app: Flask, hooks: OrderHooks, clock: FixedClock, recorder: Recorder
    ) -> None:
        self.app = app
        self.hooks = hooks
        self.clock = clock
        self.recorder = recorder
        self.client = app.test_client()
        #: Keys of verified deliveries: the only rows the table may hold.
        self.verified: set[Key] = set()
        #: Verified deliveries a test left failed or processing on purpose.
        self.unfinished: set[Key] = set()
        self._counter: sa.Connection | None = None

    @property
    def store(self) -> DeliveryStore:
        return self.hooks.state(self.app).store

    def rows(self) -> list[StoredDelivery]:
        with self.app.app_context():
            return self.store.list()

    def row(self, provider: str, callback: str, key: str) -> StoredDelivery | None:
        with self.app.app_context():
            rows = self.store.get(key, provider=provider, callback=callback)
        return rows[0] if rows else None

    def count(self) -> int:
        """The number of rows, on a connection kept for it: cheap enough to
        run after every Hypothesis example."""
        if self._counter is None:
            with self.app.app_context():
                standalone = self.hooks.state(self.app).standalone
                if standalone is not None:
                    engine = standalone.engine
                else:
                    assert self.hooks.db is not None
                    engine = self.hooks.db.engine
            self._counter = engine.connect()
        try:
            total = self._counter.execute(sa.select(sa.func.count()).select_from(self.store.table))
            return int(total.scalar_one())
        finally:
            # Never hold a read snapshot (or a lock) between requests.
            self._counter.rollback()

    def close(self) -> None:
        if self._counter is not None:
            self._counter.close()
            self._counter = None

    def snapshot(self) -> set[tuple[Any, ...]]:
        return {
            (r.provider, r.callback, r.key, r.status, r.attempts, r.body, r.error, r.updated_at)
            for r in self.rows()
        }

    def post(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        **kwargs: Any,
    ) -> TestResponse:
        self.recorder.events.clear()
        header_list = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        return self.client.post(path, data=body, headers=header_list, **kwargs)

    def refuse(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        expected: Answer,
        **kwargs: Any,
    ) -> TestResponse:
        """Post and assert the exact refusal, no receiver run, no row touched."""
        before = self.snapshot()
        response = self.post(path, body, headers, **kwargs)
        assert answer_of(PLATFORM_OF_PATH[path], response) == expected
        assert self.recorder.events == []
        assert self.snapshot() == before
        return response

    def refuse_cb(self, cb: SignedCallback, expected: Answer, **kwargs: Any) -> TestResponse:
        return self.refuse(cb.url(), cb.body, cb.headers, expected, **kwargs)

    def accept(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        key: str,
        **kwargs: Any,
    ) -> list[Captured]:
        """Post, assert the platform's success answer; the delivery is done."""
        platform = PLATFORM_OF_PATH[path]
        response = self.post(path, body, headers, **kwargs)
        assert answer_of(platform, response) == ok(platform)
        callback = path.rsplit("/", 1)[1]
        self.verified.add((platform, callback, key))
        row = self.row(platform, callback, key)
        assert row is not None
        assert row.status == "done"
        return list(self.recorder.events)

    def accept_cb(self, cb: SignedCallback, **kwargs: Any) -> list[Captured]:
        return self.accept(cb.url(), cb.body, cb.headers, cb.key, **kwargs)

    def final_check(self) -> None:
        rows = self.rows()
        stored = {(r.provider, r.callback, r.key) for r in rows}
        assert stored == self.verified, {
            "rows never verified": stored - self.verified,
            "verified but missing": self.verified - stored,
        }
        # What the suite's tests left failed or in processing, they recorded.
        assert all(
            r.status == "done" or (r.provider, r.callback, r.key) in self.unfinished for r in rows
        ), [r for r in rows if r.status != "done"]


TargetFactory = Callable[..., Target]


def _pg_schema_url(base_url: str) -> tuple[str, Callable[[], None]]:
    """A URL on a fresh schema of our own, and the function that drops it."""
    with_password = sa.make_url(base_url).set(password=DB_PASSWORD)
    stack = contextlib.ExitStack()
    url = stack.enter_context(
        private_schema(with_password.render_as_string(hide_password=False), "orderhooks_sec")
    )
    return url, stack.close


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
#: A RAM-backed folder on Linux; skipped where it does not exist.
SHARED_MEMORY = "/dev/shm"


@pytest.fixture(scope="module", params=BACKENDS)
def sec_backend(request: pytest.FixtureRequest) -> str:
    """The store backend of the module's targets: SQLite, then PostgreSQL."""
    return str(request.param)


def _factory(
    request: pytest.FixtureRequest, backend: str, workdir: Path
) -> Iterator[TargetFactory]:
    made: list[tuple[Target, SQLAlchemy | None, Callable[[], None] | None]] = []

    def make(
        *,
        host_db: bool = True,
        proxy_fix: bool = False,
        memory: bool = False,
        database_uri: str | None = None,
        **config: Any,
    ) -> Target:
        drop: Callable[[], None] | None = None
        if database_uri is None:
            if backend == "postgresql":
                database_uri, drop = _pg_schema_url(request.getfixturevalue("postgres_url"))
            else:
                folder = workdir
                if memory and os.access(SHARED_MEMORY, os.W_OK):
                    folder = Path(tempfile.mkdtemp(prefix="orderhooks-sec-", dir=SHARED_MEMORY))
                    drop = functools.partial(shutil.rmtree, folder, ignore_errors=True)
                database_uri = f"sqlite:///{folder / f'{uuid.uuid4().hex}.sqlite3'}"
        app = Flask("orderhooks_security", instance_path=str(workdir / "instance"))
        app.config.update(SECURITY_CONFIG)
        app.config["SQLALCHEMY_DATABASE_URI"] = database_uri
        if not host_db:
            app.config["ORDERHOOKS_DATABASE_URI"] = database_uri
        app.config.update(config)
        if proxy_fix:
            # The README's setup behind exactly one reverse proxy.
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
        db = SQLAlchemy(app, model_class=_Base) if host_db else None
        clock = FixedClock()
        hooks = OrderHooks(app, db=db, clock=clock)
        with app.app_context():
            if db is not None:
                db.create_all()
            else:
                hooks.create_all()
        recorder = Recorder()
        for name, signal in SIGNALS.items():
            signal.connect(recorder.receiver(name), app, weak=False)
        target = Target(app, hooks, clock, recorder)
        made.append((target, db, drop))
        return target

    yield make
    errors: list[str] = []
    for target, db, drop in made:
        try:
            target.final_check()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            _dispose(target, db, drop)
    assert not errors, f"the final check of the deliveries table failed: {errors}"


def _dispose(target: Target, db: SQLAlchemy | None, drop: Callable[[], None] | None) -> None:
    app = target.app
    try:
        target.close()
        for signal in SIGNALS.values():
            for receiver in list(signal.receivers_for(app)):
                signal.disconnect(receiver, app)
        with app.app_context():
            if db is not None:
                db.drop_all()
                db.engine.dispose()
            else:
                standalone = target.hooks.state(app).standalone
                assert standalone is not None
                standalone.metadata.drop_all(standalone.engine)
                standalone.engine.dispose()
    finally:
        # The schema or folder goes even when the tables could not be dropped.
        if drop is not None:
            drop()


@pytest.fixture(scope="module")
def make_target(
    request: pytest.FixtureRequest, sec_backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TargetFactory]:
    """Build targets on the module's backend; final-checked at module end."""
    yield from _factory(request, sec_backend, tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def make_sqlite_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TargetFactory]:
    """Build targets on SQLite files only (the Hypothesis runs)."""
    yield from _factory(request, "sqlite", tmp_path_factory.mktemp("security-sqlite"))


@pytest.fixture(scope="module")
def target(make_target: TargetFactory) -> Target:
    """The module's main target: every platform on, default limits."""
    return make_target()


@pytest.fixture
def clock(target: Target) -> Iterator[FixedClock]:
    """The main target's clock, put back to ``NOW`` after the test."""
    yield target.clock
    target.clock.now = NOW
